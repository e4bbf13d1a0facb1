#!/usr/bin/env bash
# The one installer of criopy, for every target: this checkout (make run / make test), a bare
# Debian/Ubuntu node, a kind node image and a minikube base (deploy/kind/Dockerfile runs it).
#
#   deploy/install.sh                         OS packages and /etc defaults, to run the daemon from this checkout
#   deploy/install.sh --test                  plus what the test suite uses (registry, busybox, docker, debootstrap)
#   deploy/install.sh --system [--wheels DIR] [--no-default-network]
#        a system install: OS packages, criopy in its own venv /opt/criopy (offline from the wheels in DIR,
#        built with `pip wheel`; without DIR from this source tree, which needs PyPI), /usr/local/bin/criopy,
#        the systemd unit (enabled, started when systemd runs), /etc/criopy, /etc/crictl.yaml and the
#        default bridge network when /etc/cni/net.d holds none (--no-default-network: never, for clusters
#        whose CNI writes its own config at run time, as kind's kindnet does).
#   deploy/install.sh --uninstall [--purge]
#        removes what --system installed (stopping the daemon, never the containers); an operator's edited
#        files stay; container data under /var/lib/criopy stays unless --purge, which is refused while
#        containers run (their conmon) and then removes /var/lib/criopy and /run/criopy.
#
# Idempotent: a second run (with the same wheels) changes nothing. It never overwrites a file that is
# already there, except the ones it owns outright (/opt/criopy, the unit under
# /usr/local/lib/systemd/system); operators override the unit with a drop-in or a copy in
# /etc/systemd/system.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
conf=$here/conf
venv=/opt/criopy
unit_dir=/usr/local/lib/systemd/system
unit=$unit_dir/criopy.service
wants_link=/etc/systemd/system/multi-user.target.wants/criopy.service

runtime_packages=(runc crun conmon containernetworking-plugins iptables catatonit procps
                  golang-github-containers-common python3-venv)
test_packages=(docker-registry busybox-static iproute2 procps openssl util-linux
               # grpc-go, the kubelet's gRPC stack, for tests/goclient (built in GOPATH mode).
               golang-go golang-google-grpc-dev
               # tests/e2e/test_node.py: a Debian node image built with debootstrap, run in docker.
               docker.io debootstrap)

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

install_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# A file the operator may edit: written once, never replaced.
install_once() {  # mode src dst
  [[ -e $3 ]] || { install -m "$1" "$2" "$3"; say "installed $3"; }
}

# A file criopy owns: replaced only when its content differs, so a second run touches nothing.
install_owned() {  # mode src dst
  cmp -s "$2" "$3" 2>/dev/null || { install -D -m "$1" "$2" "$3"; say "installed $3"; }
}

install_defaults() {  # [--no-default-network]
  install -d -m 0755 /etc/criopy /etc/criopy/criopy.d /etc/cni/net.d
  install_once 0644 "$conf/criopy.yaml" /etc/criopy/criopy.yaml
  install_once 0644 "$conf/crictl.yaml" /etc/crictl.yaml
  [[ ${1:-} == --no-default-network ]] && return
  # Any network config at all counts (`ls` of the three globs failed whenever one matched nothing, and
  # then rewrote the bridge config over an operator's edits).
  if ! compgen -G '/etc/cni/net.d/*.conflist' >/dev/null && ! compgen -G '/etc/cni/net.d/*.conf' >/dev/null &&
     ! compgen -G '/etc/cni/net.d/*.json' >/dev/null; then
    install -m 0644 "$conf/10-criopy-bridge.conflist" /etc/cni/net.d/10-criopy-bridge.conflist
    say "installed the default bridge network in /etc/cni/net.d"
  fi
}

systemd_running() { [[ -d /run/systemd/system ]]; }

install_venv() {  # [wheel dir]
  [[ -x $venv/bin/python ]] || { python3 -m venv "$venv"; say "created $venv"; }
  if [[ -n ${1:-} ]]; then
    # Offline: criopy and every dependency from the wheels built on the host (`pip wheel`).
    "$venv/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$1" --upgrade criopy
  else
    "$venv/bin/pip" install -q --disable-pip-version-check --upgrade "$here"
  fi
  [[ $(readlink /usr/local/bin/criopy 2>/dev/null) == "$venv/bin/criopy" ]] || {
    ln -sfn "$venv/bin/criopy" /usr/local/bin/criopy
    say "linked /usr/local/bin/criopy"
  }
}

install_unit() {
  install_owned 0644 "$here/deploy/criopy.service" "$unit"
  [[ -L $wants_link ]] || { install -d /etc/systemd/system/multi-user.target.wants; ln -s "$unit" "$wants_link"; }
  if systemd_running; then
    systemctl daemon-reload
    systemctl is-active -q criopy || systemctl start criopy
  fi
}

system_install() {
  local wheels="" network=""
  while (($#)); do
    case $1 in
      --wheels) wheels=$(cd "${2:?--wheels needs a directory}" && pwd); shift 2 ;;
      --no-default-network) network=--no-default-network; shift ;;
      *) die "unknown option $1 for --system" ;;
    esac
  done
  install_packages "${runtime_packages[@]}"
  install_venv "$wheels"
  install_defaults $network
  install_unit
}

# criopy's state and storage, with whatever it left mounted there (container root filesystems, pod shm).
purge_data() {
  local dir mnt
  for dir in /run/criopy /var/lib/criopy; do
    [[ -d $dir ]] || continue
    findmnt -rn -o TARGET | grep "^$dir/" | sort -r | while read -r mnt; do umount -l "$mnt"; done
    # A directory that is itself a mount (a volume, as on a kind node) is emptied, not removed.
    if mountpoint -q "$dir"; then find "$dir" -mindepth 1 -delete; else rm -rf "$dir"; fi
    say "removed $dir"
  done
}

uninstall() {
  local purge=${1:-}
  case $purge in "" | --purge) ;; *) die "unknown option $purge for --uninstall" ;; esac
  if [[ $purge == --purge ]] && pgrep -x conmon >/dev/null; then
    die "containers are still running (conmon: $(pgrep -x conmon | tr '\n' ' ')); remove the pods first (crictl rmp -af), or uninstall without --purge"
  fi
  if systemd_running && systemctl is-active -q criopy 2>/dev/null; then
    # KillMode=process: the daemon stops, conmon and the containers keep running.
    systemctl stop criopy
  fi
  rm -f "$wants_link" "$unit"
  systemd_running && systemctl daemon-reload
  [[ $(readlink /usr/local/bin/criopy 2>/dev/null) == "$venv/bin/criopy" ]] && rm -f /usr/local/bin/criopy
  rm -rf "$venv"
  # Config files go only while they are what install.sh wrote; an operator's edits stay.
  cmp -s "$conf/criopy.yaml" /etc/criopy/criopy.yaml && rm -f /etc/criopy/criopy.yaml
  cmp -s "$conf/crictl.yaml" /etc/crictl.yaml && rm -f /etc/crictl.yaml
  cmp -s "$conf/10-criopy-bridge.conflist" /etc/cni/net.d/10-criopy-bridge.conflist &&
    rm -f /etc/cni/net.d/10-criopy-bridge.conflist
  rmdir /etc/criopy/criopy.d /etc/criopy 2>/dev/null || true
  [[ $purge != --purge ]] || purge_data
  say "uninstalled"
}

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and writes /etc)"

case ${1:-} in
  "")
    install_packages "${runtime_packages[@]}"
    install_defaults ;;
  --test)
    install_packages "${runtime_packages[@]}" "${test_packages[@]}"
    # Debian's registry package starts a service on :5000; the tests run their own.
    if command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
      systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
    install_defaults ;;
  --system) shift; system_install "$@" ;;
  --uninstall) shift; uninstall "$@" ;;
  *) die "unknown mode $1 (see the head of this script)" ;;
esac
