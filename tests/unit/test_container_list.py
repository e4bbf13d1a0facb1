"""ListContainers answers: reused while nothing listed changed, rebuilt as soon as something did."""

from __future__ import annotations

from api.runtime.v1 import api_pb2 as pb
from cri.containers.container import Container, ContainerState
from cri.services.container_convert import ListCache
from cri.transport.grpcserver import Encoded


def container(cid: str, state: ContainerState = ContainerState.RUNNING, app: str = "web") -> Container:
    return Container(
        id=cid,
        sandbox_id="pod-1",
        config=pb.ContainerConfig(metadata=pb.ContainerMetadata(name=cid), labels={"app": app}),
        image_id="sha256:" + "a" * 64,
        image_ref="sha256:" + "a" * 64,
        image_name="busybox",
        created_at=1,
        state=state,
        runtime="runc",
        bundle="/b",
        storage="/s",
        log_path="",
        cgroups_path="/c",
        stop_signal="SIGTERM",
    )


def ids(answer: Encoded) -> list[tuple[str, int]]:
    return [(c.id, c.state) for c in pb.ListContainersResponse.FromString(answer.data).containers]


def test_an_unchanged_list_is_answered_with_the_same_bytes() -> None:
    lists = ListCache()
    containers = [container("a"), container("b")]
    first = lists.answer(containers, None)
    assert ids(first) == [("a", pb.CONTAINER_RUNNING), ("b", pb.CONTAINER_RUNNING)]
    assert lists.answer(containers, None) is first


def test_a_state_change_an_addition_or_a_removal_is_listed_at_once() -> None:
    lists = ListCache()
    containers = [container("a"), container("b")]
    lists.answer(containers, None)
    containers[1].state = ContainerState.EXITED
    assert ids(lists.answer(containers, None)) == [("a", pb.CONTAINER_RUNNING), ("b", pb.CONTAINER_EXITED)]
    containers.append(container("c", ContainerState.CREATED))
    assert [c for c, _ in ids(lists.answer(containers, None))] == ["a", "b", "c"]
    del containers[0]
    assert [c for c, _ in ids(lists.answer(containers, None))] == ["b", "c"]


def test_a_container_made_anew_with_the_same_id_and_state_is_not_taken_for_the_old_one() -> None:
    """The key is what the answer is built from, not which objects: an equal basis gives an equal answer."""
    lists = ListCache()
    first = lists.answer([container("a")], None)
    assert lists.answer([container("a")], None) is first
    assert ids(lists.answer([container("a", ContainerState.EXITED)], None)) == [("a", pb.CONTAINER_EXITED)]


def test_each_filter_keeps_its_own_answer() -> None:
    lists = ListCache()
    containers = [container("a"), container("b", app="db"), container("c", ContainerState.EXITED)]
    running = pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))
    db = pb.ContainerFilter(label_selector={"app": "db"})
    answers = [lists.answer(containers, flt) for flt in (None, running, db)]
    assert [[c for c, _ in ids(a)] for a in answers] == [["a", "b", "c"], ["a", "b"], ["b"]]
    again = [lists.answer(containers, flt) for flt in (None, running, db)]
    assert all(a is b for a, b in zip(again, answers, strict=True))


def test_only_a_bounded_number_of_filters_is_remembered() -> None:
    lists = ListCache()
    containers = [container("a")]
    for i in range(ListCache.LIMIT * 3):
        lists.answer(containers, pb.ContainerFilter(id=f"a{i}"))
    assert len(lists._last) == ListCache.LIMIT
