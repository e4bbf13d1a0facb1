from __future__ import annotations

import os
from pathlib import Path

import pytest

from cri.containers.users import ProcessUser, UserError, read_in_root, resolve

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment, and a malformed line below
broken:x:notanumber:1
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:1001::/home/bob:/bin/sh
nohome:x:1002:1002::
+nis
"""

GROUP = """\
root:x:0:
daemon:x:1:alice
alice:x:1000:
bob:x:1001:
staff:x:50:alice,bob
video:x:44: bob
wheel:x:10:root
"""


def make_rootfs(base: Path, passwd: str | None = PASSWD, group: str | None = GROUP) -> Path:
    rootfs = base / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    if passwd is not None:
        (rootfs / "etc" / "passwd").write_text(passwd)
    if group is not None:
        (rootfs / "etc" / "group").write_text(group)
    return rootfs


def run(
    rootfs: Path,
    *,
    run_as_user: int | None = None,
    run_as_username: str = "",
    run_as_group: int | None = None,
    image_user: str = "",
    supplemental_groups: tuple[int, ...] = (),
    policy: str = "Merge",
) -> ProcessUser:
    return resolve(
        rootfs,
        run_as_user=run_as_user,
        run_as_username=run_as_username,
        run_as_group=run_as_group,
        image_user=image_user,
        supplemental_groups=supplemental_groups,
        policy=policy,  # type: ignore[arg-type]
    )


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return make_rootfs(tmp_path)


# -- the image USER forms --


@pytest.mark.parametrize(
    ("image_user", "expected"),
    [
        ("", (0, 0, "root", "/root")),
        ("alice", (1000, 1000, "alice", "/home/alice")),
        ("1001", (1001, 1001, "bob", "/home/bob")),
        ("alice:staff", (1000, 50, "alice", "/home/alice")),
        ("1000:44", (1000, 44, "alice", "/home/alice")),
        ("bob:777", (1001, 777, "bob", "/home/bob")),  # a gid need not be in /etc/group
        ("1001:staff", (1001, 50, "bob", "/home/bob")),
        ("4242", (4242, 0, "", "/")),  # a uid need not be in /etc/passwd
        ("4242:4343", (4242, 4343, "", "/")),
        ("4242:staff", (4242, 50, "", "/")),
        ("alice:", (1000, 1000, "alice", "/home/alice")),
        (":staff", (0, 50, "root", "/root")),
        ("nohome", (1002, 1002, "nohome", "/")),
    ],
)
def test_image_user_forms(rootfs: Path, image_user: str, expected: tuple[int, int, str, str]) -> None:
    user = run(rootfs, image_user=image_user, policy="Strict")
    assert (user.uid, user.gid, user.username, user.home) == expected
    assert user.additional_gids == (expected[1],)


def test_image_user_name_not_found(rootfs: Path) -> None:
    with pytest.raises(UserError) as err:
        run(rootfs, image_user="nobody2")
    assert err.value.field == "image.user"
    assert str(err.value) == 'user "nobody2" not found in /etc/passwd of the container'


def test_image_group_name_not_found(rootfs: Path) -> None:
    with pytest.raises(UserError) as err:
        run(rootfs, image_user="alice:nogroup")
    assert err.value.field == "image.user"
    assert 'group "nogroup" not found in /etc/group' in str(err.value)


@pytest.mark.parametrize("image_user", ["+1", " 1", "-1", "99999999999", "1:-5"])
def test_image_user_bad_numbers(rootfs: Path, image_user: str) -> None:
    with pytest.raises(UserError) as err:
        run(rootfs, image_user=image_user)
    assert err.value.field == "image.user"


# -- run_as_* precedence --


def test_run_as_user_replaces_image_user_and_its_group(rootfs: Path) -> None:
    user = run(rootfs, run_as_user=1001, image_user="alice:staff", policy="Strict")
    assert (user.uid, user.gid, user.username) == (1001, 1001, "bob")


def test_run_as_username_wins_over_run_as_user(rootfs: Path) -> None:
    user = run(rootfs, run_as_user=1001, run_as_username="alice", policy="Strict")
    assert (user.uid, user.gid, user.username) == (1000, 1000, "alice")


def test_run_as_group_overrides_passwd_and_image_group(rootfs: Path) -> None:
    assert run(rootfs, run_as_user=1000, run_as_group=3000).gid == 3000
    # With only run_as_group, the image USER still names the user but not the group (as cri-o).
    user = run(rootfs, run_as_group=3000, image_user="bob:staff", policy="Strict")
    assert (user.uid, user.gid) == (1001, 3000)


def test_run_as_user_zero_is_root_not_unset(rootfs: Path) -> None:
    user = run(rootfs, run_as_user=0, image_user="alice")
    assert (user.uid, user.gid, user.username) == (0, 0, "root")


def test_run_as_username_not_found_blames_the_field(rootfs: Path) -> None:
    with pytest.raises(UserError) as err:
        run(rootfs, run_as_username="nobody2", image_user="alice")
    assert err.value.field == "config.linux.security_context.run_as_username"
    assert str(err.value) == 'user "nobody2" not found in /etc/passwd of the container'


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"run_as_user": -1}, "config.linux.security_context.run_as_user"),
        ({"run_as_user": 2**32}, "config.linux.security_context.run_as_user"),
        ({"run_as_user": 1, "run_as_group": -3}, "config.linux.security_context.run_as_group"),
        ({"supplemental_groups": (5, -1)}, "config.linux.security_context.supplemental_groups"),
    ],
)
def test_out_of_range_ids_blame_the_field(rootfs: Path, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(UserError) as err:
        run(rootfs, **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_unknown_policy_is_a_programming_error(rootfs: Path) -> None:
    with pytest.raises(ValueError, match="policy"):
        run(rootfs, policy="Loose")


# -- supplemental groups --


def test_merge_adds_image_memberships_and_requested_groups(rootfs: Path) -> None:
    user = run(rootfs, run_as_user=1000, run_as_group=3000, supplemental_groups=(4000,))
    # What Kubernetes documents: groups = primary + requested + /etc/group memberships of the user.
    assert user.additional_gids == (1, 50, 3000, 4000)


def test_strict_keeps_only_the_requested_groups(rootfs: Path) -> None:
    user = run(rootfs, run_as_user=1000, run_as_group=3000, supplemental_groups=(4000,), policy="Strict")
    assert user.additional_gids == (3000, 4000)


def test_merge_matches_members_by_the_name_of_a_numeric_uid(rootfs: Path) -> None:
    assert run(rootfs, image_user="1001").additional_gids == (44, 50, 1001)


def test_merge_without_a_passwd_entry_adds_nothing(rootfs: Path) -> None:
    assert run(rootfs, run_as_user=4242, supplemental_groups=(7, 7, 3)).additional_gids == (0, 3, 7)


def test_root_merge(rootfs: Path) -> None:
    assert run(rootfs).additional_gids == (0, 10)


# -- the files themselves --


def test_missing_files_mean_no_entries(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None, group=None)
    user = run(rootfs, image_user="1234:5678", supplemental_groups=(9,))
    assert user == ProcessUser(uid=1234, gid=5678, additional_gids=(9, 5678), username="", home="/")
    assert run(rootfs).uid == 0
    with pytest.raises(UserError):
        run(rootfs, image_user="alice")


def test_rootfs_without_etc(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert run(tmp_path / "empty", run_as_user=5).gid == 0


def test_relative_symlink_inside_rootfs_is_followed(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None)
    (rootfs / "usr" / "share").mkdir(parents=True)
    (rootfs / "usr" / "share" / "passwd").write_text(PASSWD)
    (rootfs / "etc" / "passwd").symlink_to("../usr/share/passwd")
    assert run(rootfs, image_user="alice").uid == 1000


def test_absolute_symlink_is_rerooted(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None)
    (rootfs / "real").mkdir()
    (rootfs / "real" / "passwd").write_text("carol:x:77:88::/c:/bin/sh\n")
    (rootfs / "etc" / "passwd").symlink_to("/real/passwd")
    user = run(rootfs, image_user="carol")
    assert (user.uid, user.gid, user.home) == (77, 88, "/c")


@pytest.fixture
def fake_host(tmp_path: Path) -> Path:
    """A file outside the rootfs that a symlink escape would read: it holds a user the rootfs lacks."""
    host_etc = tmp_path / "etc"
    host_etc.mkdir()
    (host_etc / "passwd").write_text("hostonly:x:4444:4444::/host:/bin/sh\n")
    return host_etc / "passwd"


@pytest.mark.parametrize(
    "target",
    [
        "/../../../../etc/passwd",  # naively: the real host's /etc/passwd
        "../../etc/passwd",  # naively: tmp_path/etc/passwd, the fake host file
        "../../../../../../../../../../etc/passwd",
        "/etc/../../etc/passwd",
    ],
)
def test_symlink_escape_never_reads_the_host(tmp_path: Path, fake_host: Path, target: str) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None)
    (rootfs / "etc" / "passwd").symlink_to(target)
    # Clamped at the rootfs, every target is the link itself: a loop, so no entries at all.
    assert read_in_root(rootfs, "/etc/passwd") is None
    for name in ("hostonly", "root"):  # "root" is in every real host's /etc/passwd
        with pytest.raises(UserError, match=f'user "{name}" not found'):
            run(rootfs, image_user=name)
    assert run(rootfs, run_as_user=4444).username == ""


def test_the_fake_host_file_is_what_a_naive_open_reads(tmp_path: Path, fake_host: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None)
    (rootfs / "etc" / "passwd").symlink_to("../../etc/passwd")
    assert (rootfs / "etc" / "passwd").read_text() == fake_host.read_text()  # so the test above means something


def test_symlinked_directory_escape_is_clamped(tmp_path: Path, fake_host: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "etc").symlink_to("../../etc")  # rootfs/etc -> tmp_path/etc on the host
    assert read_in_root(rootfs, "/etc/passwd") is None
    with pytest.raises(UserError):
        run(rootfs, image_user="hostonly")


def test_clamped_escape_lands_on_the_rootfs_file(tmp_path: Path, fake_host: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None)
    (rootfs / "real").mkdir()
    (rootfs / "real" / "passwd").write_text(PASSWD)
    (rootfs / "etc" / "passwd").symlink_to("/../../../../real/passwd")
    assert run(rootfs, image_user="alice").uid == 1000


def test_symlink_loop_means_no_entries(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None)
    (rootfs / "etc" / "passwd").symlink_to("passwd2")
    (rootfs / "etc" / "passwd2").symlink_to("passwd")
    assert read_in_root(rootfs, "/etc/passwd") is None
    assert run(rootfs, run_as_user=3).username == ""


def test_non_regular_files_are_not_opened(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None, group=None)
    os.mkfifo(rootfs / "etc" / "passwd")  # opening a fifo for reading would block forever
    (rootfs / "etc" / "group").mkdir()
    assert read_in_root(rootfs, "/etc/passwd") is None
    assert read_in_root(rootfs, "/etc/group") is None
    assert read_in_root(rootfs, "/") is None
    assert run(rootfs, run_as_user=1, run_as_group=2).additional_gids == (2,)


def test_file_below_a_regular_file_is_missing(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path)
    assert read_in_root(rootfs, "/etc/passwd/x") is None


def test_read_in_root_plain(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path)
    assert read_in_root(rootfs, "etc/./passwd") == PASSWD.encode()
    assert read_in_root(rootfs, "/etc/nope") is None
