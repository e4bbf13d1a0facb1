"""userns_options as the CRI defines them: what a pod or container may ask for, and the field named when not."""

from __future__ import annotations

import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.containers import validate
from cri.containers.users import ProcessUser
from cri.errors import InvalidArgument
from cri.system.idmap import IdMapping
from podsandbox.spec import Metadata, NamespaceMode, SandboxSpec, UserNamespace
from podsandbox.spec import validate as validate_pod

WHERE = "config.linux.security_context.namespace_options"


def options(
    mode: pb.NamespaceMode = pb.POD, uids: list[tuple[int, int, int]] | None = None, gids=None
) -> pb.NamespaceOption:
    uids = [(0, 100000, 65536)] if uids is None else uids
    gids = uids if gids is None else gids

    def ranges(items: list[tuple[int, int, int]]) -> list[pb.IDMapping]:
        return [pb.IDMapping(container_id=c, host_id=h, length=n) for c, h, n in items]

    return pb.NamespaceOption(userns_options=pb.UserNamespace(mode=mode, uids=ranges(uids), gids=ranges(gids)))


def refused(ns: pb.NamespaceOption) -> str:
    with pytest.raises(InvalidArgument) as err:
        validate.userns_of(ns, WHERE)
    return str(err.value)


def test_mode_pod_with_one_range_each_is_the_pods_user_namespace() -> None:
    userns = validate.userns_of(options(gids=[(0, 200000, 65536)]), WHERE)
    assert userns == UserNamespace(IdMapping(0, 100000, 65536), IdMapping(0, 200000, 65536))
    assert userns.root == (100000, 200000)


def test_node_mode_and_no_options_are_the_hosts_user_namespace() -> None:
    assert validate.userns_of(pb.NamespaceOption(), WHERE) is None
    assert validate.userns_of(options(mode=pb.NODE, uids=[]), WHERE) is None


@pytest.mark.parametrize(
    ("ns", "field", "says"),
    [
        (options(uids=[(0, 100000, 65536), (65536, 300000, 65536)]), "userns_options.uids", "exactly one"),
        (options(gids=[]), "userns_options.gids", "exactly one"),
        (options(uids=[(1, 100000, 65536)]), "userns_options.uids", "container ID 0 is not mapped"),
        (options(gids=[(0, 100000, 0)]), "userns_options.gids", "empty"),
        (options(uids=[(0, 2**32 - 10, 65536)]), "userns_options.uids", "goes past"),
        (options(mode=pb.CONTAINER), "userns_options.mode", "CONTAINER is not supported"),
        (options(mode=pb.TARGET), "userns_options.mode", "TARGET is not supported"),
    ],
)
def test_what_the_runtime_cannot_do_is_refused_naming_the_field(ns: pb.NamespaceOption, field: str, says: str) -> None:
    message = refused(ns)
    assert message.startswith(f"{WHERE}.{field}: ") and says in message


def test_a_pod_with_its_own_user_namespace_cannot_share_the_hosts_other_namespaces() -> None:
    userns = UserNamespace(IdMapping(0, 100000, 65536), IdMapping(0, 100000, 65536))
    meta = Metadata("p", "u", "ns")
    validate_pod(SandboxSpec(metadata=meta, userns=userns), "cgroupfs")
    for field, spec in (
        ("network", SandboxSpec(metadata=meta, userns=userns, network_mode=NamespaceMode.NODE)),
        ("ipc", SandboxSpec(metadata=meta, userns=userns, ipc_mode=NamespaceMode.NODE)),
        ("pid", SandboxSpec(metadata=meta, userns=userns, pid_mode=NamespaceMode.NODE)),
    ):
        with pytest.raises(InvalidArgument) as err:
            validate_pod(spec, "cgroupfs")
        assert str(err.value).startswith(f"{WHERE}.{field}: ")


def test_a_container_repeats_its_pods_options_or_says_none() -> None:
    pod = validate.userns_of(options(), WHERE)
    config = pb.ContainerConfig()
    validate.userns_agrees(config, pod, "p1")  # no options: the pod's
    config.linux.security_context.namespace_options.CopyFrom(options())
    validate.userns_agrees(config, pod, "p1")
    for other, pod_userns in (
        (options(uids=[(0, 500000, 65536)]), pod),
        (options(mode=pb.NODE), pod),
        (options(), None),
    ):
        config.linux.security_context.namespace_options.CopyFrom(other)
        with pytest.raises(InvalidArgument) as err:
            validate.userns_agrees(config, pod_userns, "p1")
        assert str(err.value).startswith(f"{WHERE}.userns_options: does not agree with pod sandbox p1")


def test_the_process_ids_must_be_mapped_inside() -> None:
    userns = UserNamespace(IdMapping(0, 100000, 1000), IdMapping(0, 100000, 1000))
    validate.user_mapped(ProcessUser(999, 999, (999, 5), "", "/"), userns)
    validate.user_mapped(ProcessUser(70000, 70000, (), "", "/"), None)
    with pytest.raises(InvalidArgument, match=r"run_as_user: uid 1000 is not mapped"):
        validate.user_mapped(ProcessUser(1000, 0, (), "", "/"), userns)
    with pytest.raises(InvalidArgument, match=r"supplemental_groups: gid 4000 is not mapped"):
        validate.user_mapped(ProcessUser(0, 0, (0, 4000), "", "/"), userns)
    # The primary group (run_as_group, or the user's own) is not a supplemental one: the error names its field.
    with pytest.raises(InvalidArgument, match=r"security_context\.run_as_group: gid 4000 is not mapped"):
        validate.user_mapped(ProcessUser(0, 4000, (4000,), "", "/"), userns)


def test_a_mount_may_ask_for_an_idmapping_of_its_pods_mapping_only() -> None:
    uids = [pb.IDMapping(container_id=0, host_id=100000, length=65536)]
    mount = pb.Mount(container_path="/v", host_path="/srv/v", uidMappings=uids, gidMappings=uids)
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="c"), image=pb.ImageSpec(image="busybox"), mounts=[mount]
    )
    validate.request(config)
    pod = validate.userns_of(options(), WHERE)
    validate.userns_agrees(config, pod, "p1")
    with pytest.raises(InvalidArgument, match=r"^config.mounts\[0\].uidMappings: an idmapped mount takes"):
        validate.userns_agrees(config, None, "p1")
    with pytest.raises(InvalidArgument, match=r"^config.mounts\[0\].uidMappings: "):
        validate.userns_agrees(config, validate.userns_of(options(uids=[(0, 500000, 65536)]), WHERE), "p1")
    for broken, field in (
        (pb.Mount(container_path="/v", host_path="/v", uidMappings=uids), "gidMappings"),
        (pb.Mount(container_path="/v", host_path="/v", uidMappings=uids * 2, gidMappings=uids), "uidMappings"),
        (
            pb.Mount(
                container_path="/v",
                host_path="/v",
                uidMappings=uids,
                gidMappings=uids,
                propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
            ),
            "propagation",
        ),
    ):
        config.mounts[0].CopyFrom(broken)
        with pytest.raises(InvalidArgument) as err:
            validate.request(config)
        assert str(err.value).startswith(f"config.mounts[0].{field}: ")
