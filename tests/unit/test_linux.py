from __future__ import annotations

from cri.system.linux import parse_mountinfo

MOUNTINFO = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "40 22 0:35 / /var/lib/criopy/overlay/a\\040b/merged rw - overlay overlay rw,lowerdir=/l\n"
    "41 22 0:36 / /run/criopy/shm rw shared:2 master:1 - tmpfs shm rw,size=65536k\n"
)


def test_mountinfo_fields_and_octal_escapes():
    entries = parse_mountinfo(MOUNTINFO)
    assert [e.mount_point for e in entries] == ["/", "/var/lib/criopy/overlay/a b/merged", "/run/criopy/shm"]
    assert [e.fstype for e in entries] == ["ext4", "overlay", "tmpfs"]
    assert entries[2].source == "shm"
