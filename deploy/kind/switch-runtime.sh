#!/bin/sh
# Build step of deploy/kind/Dockerfile, after install.sh --system: containerd off, criopy on, and the
# images the base preloads into containerd's store moved into criopy's (a kind node must boot without
# pulling its control-plane images). A base without containerd skips both.
set -eu

etc_unit=/etc/systemd/system/containerd.service
if [ -e "$etc_unit" ] || [ -e /lib/systemd/system/containerd.service ] || [ -e /usr/lib/systemd/system/containerd.service ]; then
  systemctl disable containerd.service 2>/dev/null || true
  # kind ships its unit as a file in /etc/systemd/system, where `systemctl mask` refuses to put its link:
  # kept aside under a name systemd does not load.
  if [ -f "$etc_unit" ] && [ ! -L "$etc_unit" ]; then
    mv "$etc_unit" "$etc_unit.before-criopy"
  fi
  # Masked, not only disabled: kind's units and the kubelet's drop-ins may still name it.
  systemctl mask containerd.service
  echo "switch-runtime: containerd masked"
fi

# The base's crictl config names containerd's socket (kind writes one); install.sh leaves an existing file
# alone, but this one is part of the runtime being replaced.
if grep -q "containerd.sock" /etc/crictl.yaml 2>/dev/null; then
  install -m 0644 "$(dirname "$0")/../../conf/crictl.yaml" /etc/crictl.yaml
  echo "switch-runtime: /etc/crictl.yaml points at criopy"
fi

if ! command -v containerd >/dev/null || ! command -v ctr >/dev/null; then
  echo "switch-runtime: no containerd in the base, no preloaded images to move"
  exit 0
fi

# containerd runs only for this step, on a private socket, to read its content store.
sock=/tmp/criopy-preload/containerd.sock
mkdir -p /tmp/criopy-preload
containerd --address "$sock" >/tmp/criopy-preload/containerd.log 2>&1 &
containerd_pid=$!
stop_containerd() { kill "$containerd_pid" 2>/dev/null || true; wait "$containerd_pid" 2>/dev/null || true; }
trap stop_containerd EXIT
tries=0
until ctr --address "$sock" version >/dev/null 2>&1; do
  tries=$((tries + 1))
  [ "$tries" -lt 100 ] || { cat /tmp/criopy-preload/containerd.log >&2; echo "switch-runtime: containerd did not start" >&2; exit 1; }
  sleep 0.1
done

# Tagged references only: the digest-only entries are the same images again.
refs=$(ctr --address "$sock" -n k8s.io images ls -q | grep -v '^sha256:' || true)
if [ -z "$refs" ]; then
  echo "switch-runtime: containerd holds no images"
  exit 0
fi
# shellcheck disable=SC2086 # one argument per reference
ctr --address "$sock" -n k8s.io images export /tmp/criopy-preload/images.tar $refs
stop_containerd
trap - EXIT
# The daemon is not running during a build: the import writes criopy's store directly.
criopy images import /tmp/criopy-preload/images.tar
echo "switch-runtime: moved $(echo "$refs" | wc -l) preloaded images into criopy:"
echo "$refs" | sed 's/^/  /'
# containerd's copy is no longer read by anything.
rm -rf /tmp/criopy-preload /var/lib/containerd
