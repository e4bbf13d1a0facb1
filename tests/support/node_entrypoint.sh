#!/bin/sh
# PID 1 of a test node container until it execs systemd: what kind's node entrypoint and --privileged
# arrange, for a node run without --privileged (these machines withhold CAP_SYS_RESOURCE, which
# --privileged needs). The node has a private cgroup namespace, so every cgroup mount here shows only the
# node's own subtree; nothing below touches a host mount.
set -eu

# docker mounts the node's cgroup hierarchies read-only; systemd and criopy must write their subtree.
# A bind remount changes this mount point's flag only, never the hierarchy's (host-wide) superblock.
# /sys/fs/cgroup itself is the node's own tmpfs instance.
mount -o remount,rw /sys/fs/cgroup
# (The fstype is the field after the " - " separator; the optional fields before it vary in number.)
awk '{ for (i = 7; i < NF; i++) if ($i == "-") break; if ($(i + 1) ~ /^cgroup2?$/) print $5 }' /proc/self/mountinfo |
while read -r hierarchy; do
  mount -o remount,bind,rw "$hierarchy"
done

# A v1 hierarchy is one kernel-wide object: were systemd to mount the controllers no hierarchy holds here
# (hugetlb, net_cls, perf_event, ... which a hybrid host leaves on cgroup2), it would create them for the
# whole host and take them off the host's v2 tree. An empty read-only tmpfs where each would go makes
# systemd take it as mounted; criopy reads controllers from the mount table and does not count it.
tail -n +2 /proc/cgroups | while read -r controller hierarchy _ enabled; do
  if [ "$hierarchy" = 0 ] && [ "$enabled" = 1 ] && ! mountpoint -q "/sys/fs/cgroup/$controller"; then
    mkdir -p "/sys/fs/cgroup/$controller"
    mount -t tmpfs -o ro,size=4k,mode=555 "absent-$controller" "/sys/fs/cgroup/$controller"
  fi
done

export container=docker
exec /sbin/init "$@"
