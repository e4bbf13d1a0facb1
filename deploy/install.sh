#!/usr/bin/env bash
# Installs what criopy needs on a Debian/Ubuntu host: the runtimes, the monitor,
# CNI plugins and the default config files (never overwriting an existing one).
#   deploy/install.sh          packages for running the daemon
#   deploy/install.sh --test   plus what the test suite uses (registry, static busybox)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
packages=(runc crun conmon containernetworking-plugins iptables catatonit
          golang-github-containers-common python3-venv)
if [[ "${1:-}" == "--test" ]]; then
  packages+=(docker-registry busybox-static iproute2 procps openssl util-linux
            # grpc-go, the kubelet's gRPC stack, for tests/goclient (built in GOPATH mode).
            golang-go golang-google-grpc-dev)
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "install.sh: must run as root (it installs packages and writes /etc)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's registry package starts a service on :5000; the tests run their own.
if [[ "${1:-}" == "--test" ]] && command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

install -d -m 0755 /etc/criopy /etc/criopy/criopy.d /etc/cni/net.d
[[ -e /etc/criopy/criopy.yaml ]] || install -m 0644 "$here/conf/criopy.yaml" /etc/criopy/criopy.yaml
[[ -e /etc/crictl.yaml ]] || install -m 0644 "$here/conf/crictl.yaml" /etc/crictl.yaml
if ! ls /etc/cni/net.d/*.conflist /etc/cni/net.d/*.conf /etc/cni/net.d/*.json >/dev/null 2>&1; then
  install -m 0644 "$here/conf/10-criopy-bridge.conflist" /etc/cni/net.d/10-criopy-bridge.conflist
  echo "install.sh: installed the default bridge network in /etc/cni/net.d"
fi
