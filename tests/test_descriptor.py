"""QueueDescriptor: fields, validation, round trips, equality, factories (spec/descriptor.md D1-D21)."""

from __future__ import annotations

import copy as copy_module
import dataclasses
import json
import math
import os
import pickle
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _helpers import local_meta, registered_queue_type
from hypothesis import given
from hypothesis import strategies as st

from sage_queue import (
    QUEUE_STUB_MAPPING,
    BackendUnavailable,
    DescriptorError,
    InvalidMetadata,
    MalformedDescriptor,
    QueueDescriptor,
    UnknownQueueType,
    UnsupportedVersion,
    resolve_descriptor,
)
from sage_queue.backends.local import live_queue_ids
from sage_queue.registry import canonical_type

CONTROL_CHARS = [chr(i) for i in range(0x20)] + ["\x7f"]
SHM_TYPES = [t for t in ("shm", "sage") if QUEUE_STUB_MAPPING.available(t)]

# -- strategies ------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
queue_ids = st.text(st.characters(blacklist_characters=CONTROL_CHARS), min_size=1, max_size=255)
timestamps = (
    st.none()
    | st.floats(min_value=0, allow_nan=False, allow_infinity=False)
    | st.integers(min_value=0, max_value=2**53)
)
shm_names = st.text("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_.-", min_size=1, max_size=200)


def extra_metadata(known: set[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text(max_size=10).filter(lambda k: k not in known), json_values, max_size=4)


@st.composite
def local_descriptors(draw: st.DrawFn) -> QueueDescriptor:
    metadata = draw(extra_metadata({"maxsize", "owner_pid"}))
    if draw(st.booleans()):
        metadata["maxsize"] = draw(st.integers(min_value=0, max_value=2**40))
    metadata["owner_pid"] = draw(st.integers(min_value=1, max_value=2**31))  # required (D10)
    return QueueDescriptor(draw(queue_ids), "local", metadata, draw(timestamps))


@st.composite
def shm_descriptors(draw: st.DrawFn) -> QueueDescriptor:
    metadata = draw(extra_metadata({"shm_name", "maxsize", "capacity_bytes", "create"}))
    metadata["shm_name"] = draw(shm_names)
    if draw(st.booleans()):
        metadata["maxsize"] = draw(st.integers(min_value=0, max_value=2**31))
    if draw(st.booleans()):
        # Within every backend's ring sizes (narrower than the table's "> 0"; see test_schema).
        metadata["capacity_bytes"] = draw(st.integers(min_value=1024, max_value=2**31))
    if draw(st.booleans()):
        metadata["create"] = draw(st.booleans())
    queue_type = draw(st.sampled_from(["shm", "sage", "sage_queue"]))  # parsing needs no backend (D13)
    return QueueDescriptor(draw(queue_ids), queue_type, metadata, draw(timestamps))


@st.composite
def remote_descriptors(draw: st.DrawFn) -> QueueDescriptor:
    """ray_queue, ray_actor and rpc: not shipped, yet their descriptors are valid here (D13)."""
    queue_type = draw(st.sampled_from(["ray_queue", "ray_actor", "rpc"]))
    names = st.text(min_size=1, max_size=20)
    if queue_type == "rpc":
        metadata = draw(extra_metadata({"host", "port", "name", "maxsize"}))
        metadata.update(host=draw(names), port=draw(st.integers(0, 65535)), name=draw(names))
    else:
        metadata = draw(extra_metadata({"actor_name", "maxsize", "namespace"}))
        metadata["actor_name"] = draw(names)
        if draw(st.booleans()):
            metadata["namespace"] = draw(st.text(min_size=1, max_size=10))
    if draw(st.booleans()):
        metadata["maxsize"] = draw(st.integers(min_value=0, max_value=2**63 - 1))
    return QueueDescriptor(draw(queue_ids), queue_type, metadata, draw(timestamps))


valid_descriptors = local_descriptors() | shm_descriptors() | remote_descriptors()


def local_dict(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1,
        "queue_id": "q1",
        "queue_type": "local",
        "metadata": local_meta(maxsize=3),
        "created_timestamp": 12.5,
    }
    data.update(overrides)
    return data


# -- D1 fields -------------------------------------------------------------------------------------


@pytest.mark.spec("D1")
def test_exactly_the_five_fields() -> None:
    assert [f.name for f in dataclasses.fields(QueueDescriptor)] == [
        "queue_id",
        "queue_type",
        "metadata",
        "created_timestamp",
        "version",
    ]
    assert set(QueueDescriptor.from_dict(local_dict()).to_dict()) == {
        "version",
        "queue_id",
        "queue_type",
        "metadata",
        "created_timestamp",
    }


@pytest.mark.spec("D1")
@pytest.mark.parametrize("extra", ["extra", "queueId", "Version", ""])
def test_unknown_top_level_field_is_refused(extra: str) -> None:
    with pytest.raises(MalformedDescriptor, match="unknown descriptor fields"):
        QueueDescriptor.from_dict({**local_dict(), extra: 1})
    with pytest.raises(MalformedDescriptor):
        QueueDescriptor.from_json(json.dumps({**local_dict(), extra: None}))


class _NoMetadataRules:
    """A backend class without ``validate_metadata``: its descriptors keep metadata exactly as read."""

    def __init__(self, descriptor: QueueDescriptor) -> None:
        self.descriptor = descriptor


@pytest.fixture
def rule_free_type() -> Iterator[str]:
    with registered_queue_type("test", _NoMetadataRules) as name:
        yield name


@pytest.mark.spec("D1")
def test_optional_fields_may_be_absent_or_null() -> None:
    minimal = QueueDescriptor.from_dict({"queue_id": "q1", "queue_type": "local", "metadata": local_meta()})
    assert minimal.version == 1
    assert minimal.created_timestamp is None
    assert minimal.metadata == {"maxsize": 0, "owner_pid": os.getpid()}  # plus the filled-in default (D10)
    nulls = QueueDescriptor.from_dict(
        {"queue_id": "q1", "queue_type": "local", "metadata": local_meta(), "created_timestamp": None}
    )
    assert nulls == minimal


@pytest.mark.spec("D1")
def test_absent_or_null_metadata_reads_as_empty(rule_free_type: str) -> None:
    for data in (
        {"queue_id": "q1", "queue_type": rule_free_type},
        {"queue_id": "q1", "queue_type": rule_free_type, "metadata": None},
    ):
        desc = QueueDescriptor.from_dict(data)
        assert desc.metadata == {}
        assert json.loads(desc.to_json())["metadata"] == {}
    # For local, {} lacks the required owner_pid: absent and null metadata are refused exactly as {} is.
    refusals = []
    metadata_fields: list[dict[str, Any]] = [{"metadata": {}}, {}, {"metadata": None}]
    for fields in metadata_fields:
        with pytest.raises(InvalidMetadata, match="owner_pid") as info:
            QueueDescriptor.from_dict({"queue_id": "q1", "queue_type": "local", **fields})
        refusals.append(str(info.value))
    assert len(set(refusals)) == 1, refusals


@pytest.mark.spec("D1")
@pytest.mark.parametrize("missing", ["queue_id", "queue_type"])
def test_required_field_missing_is_malformed(missing: str) -> None:
    data = local_dict()
    del data[missing]
    with pytest.raises(MalformedDescriptor, match=missing):
        QueueDescriptor.from_dict(data)


# -- D2 version ------------------------------------------------------------------------------------


@pytest.mark.spec("D2")
@pytest.mark.parametrize("version", [0, 2, 99, -1, 2**70])
def test_other_versions_are_unsupported(version: int) -> None:
    with pytest.raises(UnsupportedVersion, match="reads version 1"):
        QueueDescriptor.from_dict(local_dict(version=version))
    with pytest.raises(UnsupportedVersion):
        QueueDescriptor("q1", "local", local_meta(), version=version)


@pytest.mark.spec("D2")
@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1]])
def test_non_integer_version_is_malformed(version: Any) -> None:
    with pytest.raises(MalformedDescriptor, match="version"):
        QueueDescriptor.from_dict(local_dict(version=version))


@pytest.mark.spec("D2")
def test_writes_version_1() -> None:
    assert json.loads(QueueDescriptor.create_local_queue().to_json())["version"] == 1


# -- D3 queue_id -----------------------------------------------------------------------------------


@pytest.mark.spec("D3")
@pytest.mark.parametrize(
    "queue_id",
    ["", "a" * 256, "\x00", "tab\there", "new\nline", "trailing\n", "del\x7f", "\x1f", 7, None, b"bytes", ["q"]],
)
def test_bad_queue_id_is_malformed(queue_id: Any) -> None:
    with pytest.raises(MalformedDescriptor, match="queue_id"):
        QueueDescriptor.from_dict(local_dict(queue_id=queue_id))
    with pytest.raises(MalformedDescriptor):
        QueueDescriptor(queue_id, "local", local_meta())


@pytest.mark.spec("D3")
@pytest.mark.parametrize("queue_id", ["a", "a" * 255, "ünïcødé ☃ 队列", "with space", "\x80\u2028", "/slash:colon"])
def test_good_queue_id_is_kept(queue_id: str) -> None:
    desc = QueueDescriptor.from_dict(local_dict(queue_id=queue_id))
    assert desc.queue_id == queue_id
    assert QueueDescriptor.from_json(desc.to_json()).queue_id == queue_id


# -- D4 queue_type ---------------------------------------------------------------------------------


@pytest.mark.spec("D4")
@pytest.mark.parametrize("queue_type", ["nope", "", "LOCAL", "local ", "sage-queue"])
def test_unknown_queue_type_lists_registered_types(queue_type: str) -> None:
    with pytest.raises(UnknownQueueType) as info:
        QueueDescriptor.from_dict(local_dict(queue_type=queue_type))
    for registered in ("local", "shm", "sage"):
        assert registered in str(info.value)


@pytest.mark.spec("D4")
@pytest.mark.parametrize("queue_type", [1, None, ["local"], {"local": 1}])
def test_non_string_queue_type_is_malformed(queue_type: Any) -> None:
    with pytest.raises(MalformedDescriptor, match="queue_type"):
        QueueDescriptor.from_dict(local_dict(queue_type=queue_type))


@pytest.mark.spec("D4")
def test_sage_queue_is_an_alias_of_sage() -> None:
    assert canonical_type("sage_queue") == "sage"
    assert canonical_type("local") == "local"
    if "sage" not in SHM_TYPES:
        pytest.skip("the sage backend does not import here; the alias's storage is checked when it does")
    desc = QueueDescriptor.from_dict({"queue_id": "x", "queue_type": "sage_queue", "metadata": {"shm_name": "x"}})
    assert desc.queue_type == "sage"
    assert json.loads(desc.to_json())["queue_type"] == "sage"


# -- D5 metadata -----------------------------------------------------------------------------------


def _deep(depth: int) -> list[Any]:
    outer: list[Any] = []
    inner = outer
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return outer


@pytest.mark.spec("D5")
@pytest.mark.parametrize(
    "metadata",
    [
        [("maxsize", 1)],
        "maxsize=1",
        5,
        {1: "int key"},
        {("t",): 1},
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": [1, float("-inf")]},
        {"x": {1, 2}},
        {"x": object()},
        {"x": b"bytes"},
        {"x": _deep(5000)},
    ],
)
def test_metadata_must_be_a_json_object(metadata: Any) -> None:
    with pytest.raises(MalformedDescriptor, match="metadata"):
        QueueDescriptor.from_dict(local_dict(metadata=metadata))


@pytest.mark.spec("D5")
def test_circular_metadata_is_malformed() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(MalformedDescriptor):
        QueueDescriptor("q", "local", local_meta(x=loop))


@pytest.mark.spec("D5")
def test_metadata_is_a_deep_json_copy() -> None:
    source: dict[str, Any] = local_meta(maxsize=2, nested={"list": [1, 2]}, tuple=(1, "a"))
    desc = QueueDescriptor("q", "local", source)
    source["nested"]["list"].append(3)
    source["maxsize"] = 99
    assert desc.metadata["nested"] == {"list": [1, 2]}
    assert desc.metadata["maxsize"] == 2
    assert desc.metadata["tuple"] == [1, "a"]
    assert isinstance(desc.metadata["tuple"], list)  # a (frozen, D9) list, no longer a tuple


# -- D6 created_timestamp --------------------------------------------------------------------------


@pytest.mark.spec("D6")
@pytest.mark.parametrize("ts", [-1, -0.5, "2024", True, False, float("nan"), float("inf"), 10**400, [1.0]], ids=repr)
def test_bad_timestamp_is_malformed(ts: Any) -> None:
    with pytest.raises(MalformedDescriptor, match="created_timestamp"):
        QueueDescriptor.from_dict(local_dict(created_timestamp=ts))


@pytest.mark.spec("D6")
@pytest.mark.parametrize("ts", [0, 0.0, 1, 1795812725.91, 2**53])
def test_good_timestamp_is_a_float(ts: float) -> None:
    desc = QueueDescriptor.from_dict(local_dict(created_timestamp=ts))
    assert desc.created_timestamp == ts
    assert type(desc.created_timestamp) is float


# -- D7, D8 round trips ----------------------------------------------------------------------------


@pytest.mark.spec("D7")
def test_unknown_metadata_keys_survive_every_round_trip() -> None:
    extra = {"purpose": "ingest", "nested": {"a": [1, 2.5, None, True]}, "": "empty key", "ü": -0.0}
    desc = QueueDescriptor.create_local_queue(maxsize=4)
    desc = QueueDescriptor(desc.queue_id, "local", {**desc.metadata, **extra}, desc.created_timestamp)
    for copy in (
        QueueDescriptor.from_json(desc.to_json()),
        QueueDescriptor.from_dict(desc.to_dict()),
        pickle.loads(pickle.dumps(desc)),
        QueueDescriptor.from_json(desc.to_json().encode()),
    ):
        for key, value in extra.items():
            assert json.dumps(copy.metadata[key]) == json.dumps(value)


@pytest.mark.spec("D7", "D8")
@given(valid_descriptors)
def test_round_trips_are_exact(desc: QueueDescriptor) -> None:
    via_json = QueueDescriptor.from_json(desc.to_json())
    via_dict = QueueDescriptor.from_dict(desc.to_dict())
    via_pickle = pickle.loads(pickle.dumps(desc, protocol=pickle.HIGHEST_PROTOCOL))
    via_pickle0 = pickle.loads(pickle.dumps(desc, protocol=0))
    for copy in (via_json, via_dict, via_pickle, via_pickle0):
        assert copy == desc
        assert copy.to_json() == desc.to_json()
        assert hash(copy) == hash(desc)
    # D7: every metadata key, known or not, is still there with the same JSON value.
    assert json.dumps(via_json.metadata, sort_keys=True) == json.dumps(desc.metadata, sort_keys=True)


@pytest.mark.spec("D8")
def test_to_dict_is_a_fresh_json_ready_copy() -> None:
    desc = QueueDescriptor("q", "local", local_meta(nested={"list": [1]}))
    data = desc.to_dict()
    assert json.loads(json.dumps(data)) == data
    data["metadata"]["nested"]["list"].append(2)
    assert desc.metadata["nested"]["list"] == [1]
    assert desc.to_dict()["metadata"]["nested"]["list"] == [1]


# -- D9 equality, hashing, immutability ------------------------------------------------------------


@pytest.mark.spec("D9")
def test_equality_is_by_value() -> None:
    pid = os.getpid()
    a = QueueDescriptor("q", "local", {"maxsize": 3, "b": [1], "a": {"x": 1}, "owner_pid": pid}, 5.0)
    b = QueueDescriptor.from_json(
        json.dumps(
            {
                "metadata": {"owner_pid": pid, "a": {"x": 1}, "b": [1], "maxsize": 3},
                "queue_type": "local",
                "queue_id": "q",
                "created_timestamp": 5,
            }
        )
    )
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != QueueDescriptor("q", "local", {"maxsize": 4, "b": [1], "a": {"x": 1}, "owner_pid": pid}, 5.0)
    assert a != QueueDescriptor("q", "local", {"maxsize": 3, "b": [1], "a": {"x": 1}, "owner_pid": pid + 1}, 5.0)
    assert a != QueueDescriptor("q2", "local", a.metadata, 5.0)
    assert a != QueueDescriptor("q", "local", a.metadata, 6.0)
    assert a != a.to_dict()


@pytest.mark.spec("D9", "D12")
@pytest.mark.parametrize(("left", "right"), [(1, 1.0), (1, True), (0.0, -0.0), (0, False)])
def test_equal_descriptors_have_equal_hashes_and_json(left: Any, right: Any) -> None:
    # Python says 1 == 1.0 == True, JSON says they are different values: equality must follow
    # the JSON, else two "equal" descriptors would hash and serialise differently.
    a = QueueDescriptor("q", "local", local_meta(x=left))
    b = QueueDescriptor("q", "local", local_meta(x=right))
    assert (a == b) == (a.to_json() == b.to_json())
    if a == b:
        assert hash(a) == hash(b)


@pytest.mark.spec("D9")
@given(valid_descriptors, valid_descriptors)
def test_hash_is_consistent_with_equality(a: QueueDescriptor, b: QueueDescriptor) -> None:
    assert (a == b) == (a.to_json() == b.to_json())
    if a == b:
        assert hash(a) == hash(b)


@pytest.mark.spec("D9")
def test_descriptors_are_immutable() -> None:
    desc = QueueDescriptor.create_local_queue(maxsize=2)
    before = desc.to_json()
    with pytest.raises(dataclasses.FrozenInstanceError):
        desc.queue_id = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        desc.metadata = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        desc.metadata["maxsize"] = 100
    with pytest.raises(TypeError):
        del desc.metadata["maxsize"]
    with pytest.raises(TypeError):
        desc.metadata.update(maxsize=5)
    assert desc.to_json() == before


@pytest.mark.spec("D9")
def test_nested_metadata_is_immutable_too() -> None:
    desc = QueueDescriptor("q", "local", local_meta(nested={"list": [1, {"deep": [2]}]}))
    before, before_hash = desc.to_json(), hash(desc)
    nested, inner_list = desc.metadata["nested"], desc.metadata["nested"]["list"]
    mutations: list[Callable[[], Any]] = [
        lambda: inner_list.append(2),
        lambda: inner_list.extend([2]),
        lambda: inner_list.__setitem__(0, 5),
        lambda: inner_list.__delitem__(0),
        lambda: inner_list.__iadd__([2]),
        lambda: inner_list.sort(),
        lambda: inner_list[1]["deep"].append(3),
        lambda: nested.__setitem__("other", 1),
        lambda: nested.setdefault("other", 1),
        lambda: nested.update(other=1),
        lambda: nested.__ior__({"other": 1}),
        lambda: nested.pop("list"),
    ]
    for mutate in mutations:
        with pytest.raises(TypeError):
            mutate()
    assert desc.to_json() == before and hash(desc) == before_hash


@pytest.mark.spec("D9")
def test_copies_of_metadata_are_plain_and_mutable() -> None:
    desc = QueueDescriptor("q", "local", local_meta(nested={"list": [1, {"deep": [2]}]}))
    before = desc.to_json()
    for thawed in (
        copy_module.copy(desc.metadata),
        copy_module.deepcopy(desc.metadata),
        pickle.loads(pickle.dumps(desc.metadata)),
        desc.to_dict()["metadata"],
    ):
        assert type(thawed) is dict and type(thawed["nested"]) is dict
        assert type(thawed["nested"]["list"]) is list and type(thawed["nested"]["list"][1]) is dict
        thawed["nested"]["list"][1]["deep"].append(3)
        thawed["added"] = True
    assert desc.to_json() == before


# -- D10 per-type metadata -------------------------------------------------------------------------


@pytest.mark.spec("D10")
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("maxsize", -1),
        ("maxsize", True),
        ("maxsize", "3"),
        ("maxsize", 1.5),
        ("maxsize", 2.0),
        ("maxsize", None),
        ("maxsize", [3]),
        ("owner_pid", 0),
        ("owner_pid", -5),
        ("owner_pid", False),
        ("owner_pid", "123"),
        ("owner_pid", None),
    ],
    ids=repr,
)
def test_bad_local_metadata_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(InvalidMetadata, match=key):
        QueueDescriptor.from_dict(local_dict(metadata=local_meta(**{key: value})))  # only `key` is wrong


@pytest.mark.spec("D10", "R8")
@pytest.mark.parametrize(
    "metadata", [{}, {"maxsize": 3}, {"maxsize": 0, "purpose": "no owner"}, {"pid": 1, "owner": 1}], ids=repr
)
def test_local_descriptor_without_owner_pid_is_invalid(metadata: dict[str, Any]) -> None:
    # Without owner_pid another process could not tell that the queue is not its own, and would
    # silently make a second queue (Q43); so the key is required, at every entry point.
    queue_id = f"d10-{uuid.uuid4().hex}"
    data: dict[str, Any] = {"queue_id": queue_id, "queue_type": "local", "metadata": metadata}
    builds: list[Callable[[], Any]] = [
        lambda: QueueDescriptor(queue_id, "local", metadata),
        lambda: QueueDescriptor.from_dict(data),
        lambda: QueueDescriptor.from_json(json.dumps(data)),
        lambda: pickle.loads(pickle.dumps(_Forged(data))),
        lambda: resolve_descriptor(data),
        lambda: resolve_descriptor(json.dumps(data).encode()),
    ]
    before = live_queue_ids()
    for build in builds:
        with pytest.raises(InvalidMetadata, match="owner_pid"):
            build()
    assert live_queue_ids() == before


@pytest.mark.spec("D10")
def test_local_defaults_are_filled_in() -> None:
    assert QueueDescriptor("q", "local", {"owner_pid": 7}).metadata == {"maxsize": 0, "owner_pid": 7}
    # owner_pid is kept as given, also when it is not this process: only resolving checks it (R8).
    assert QueueDescriptor("q", "local", {"owner_pid": os.getpid() + 1, "maxsize": 5}).metadata == {
        "maxsize": 5,
        "owner_pid": os.getpid() + 1,
    }


@pytest.mark.spec("D10")
@pytest.mark.parametrize("queue_type", SHM_TYPES or ["shm"])
@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({}, "shm_name"),
        ({"shm_name": None}, "shm_name"),
        ({"shm_name": ""}, "shm_name"),
        ({"shm_name": "a/b"}, "shm_name"),
        ({"shm_name": "a b"}, "shm_name"),
        ({"shm_name": "x" * 201}, "shm_name"),
        ({"shm_name": "ok\n"}, "shm_name"),
        ({"shm_name": 5}, "shm_name"),
        ({"shm_name": "ok", "maxsize": -1}, "maxsize"),
        ({"shm_name": "ok", "maxsize": True}, "maxsize"),
        ({"shm_name": "ok", "capacity_bytes": 0}, "capacity_bytes"),
        ({"shm_name": "ok", "capacity_bytes": 1.5}, "capacity_bytes"),
        ({"shm_name": "ok", "create": 1}, "create"),
        ({"shm_name": "ok", "create": "yes"}, "create"),
    ],
    ids=repr,
)
def test_bad_shm_metadata_names_the_key(queue_type: str, metadata: dict[str, Any], key: str) -> None:
    if queue_type not in SHM_TYPES:
        pytest.skip(f"the {queue_type} backend does not import here")
    with pytest.raises(InvalidMetadata, match=key):
        QueueDescriptor.from_dict({"queue_id": "q", "queue_type": queue_type, "metadata": metadata})


@pytest.mark.spec("D10")
@pytest.mark.parametrize("queue_type", SHM_TYPES or ["shm"])
def test_shm_defaults_are_filled_in(queue_type: str) -> None:
    if queue_type not in SHM_TYPES:
        pytest.skip(f"the {queue_type} backend does not import here")
    desc = QueueDescriptor("q", queue_type, {"shm_name": "q"})
    assert desc.metadata["maxsize"] == 0
    assert desc.metadata["create"] is True
    assert desc.metadata["shm_name"] == "q"


# -- D11 validation at build and at parse ----------------------------------------------------------


class _Forged:
    """Pickles as a call of from_dict on a bad dict: what a tampered or foreign pickle would carry."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        return (QueueDescriptor.from_dict, (self.data,))


@pytest.mark.spec("D11")
@pytest.mark.parametrize(
    ("data", "error"),
    [
        (local_dict(queue_id=""), MalformedDescriptor),
        (local_dict(version=2), UnsupportedVersion),
        (local_dict(queue_type="nope"), UnknownQueueType),
        (local_dict(metadata={"maxsize": -3}), InvalidMetadata),
        (local_dict(metadata={"maxsize": 3}), InvalidMetadata),  # no owner_pid
    ],
)
def test_unpickling_revalidates(data: dict[str, Any], error: type[Exception]) -> None:
    blob = pickle.dumps(_Forged(data))
    with pytest.raises(error):
        pickle.loads(blob)


@pytest.mark.spec("D11")
def test_validation_happens_in_the_constructor_and_replace() -> None:
    desc = QueueDescriptor.create_local_queue(maxsize=1)
    with pytest.raises(InvalidMetadata, match="maxsize"):
        dataclasses.replace(desc, metadata={**desc.metadata, "maxsize": -1})
    with pytest.raises(InvalidMetadata, match="owner_pid"):
        dataclasses.replace(desc, metadata={"maxsize": 1})
    with pytest.raises(MalformedDescriptor):
        dataclasses.replace(desc, queue_id="")
    with pytest.raises(InvalidMetadata):
        QueueDescriptor.create_local_queue(maxsize=-1)
    with pytest.raises(InvalidMetadata):
        QueueDescriptor.create_local_queue(maxsize=True)
    with pytest.raises(MalformedDescriptor):
        QueueDescriptor.create_local_queue(queue_id="")


@pytest.mark.spec("D11")
@pytest.mark.parametrize(
    "bad",
    [
        local_dict(metadata={"maxsize": -1}),
        local_dict(metadata={"maxsize": "x"}),
        local_dict(queue_id="ok", metadata=[1]),
        '{"queue_id": "q", "queue_type": "local", "metadata": {"maxsize": null}}',
        '{"queue_id": "q", "queue_type": "local", "metadata": {"maxsize": 1}}',
        '{"queue_id": "q", "queue_type": "local"}',
        b'{"queue_id": "q", "queue_type": "local", "bogus": 1}',
        "not json",
        "[1, 2]",
        "",
        b"\xff\xfe\x00",
        "[" * 100_000,
        42,
        None,
        ["queue_id", "q"],
    ],
    ids=lambda v: repr(v)[:40],
)
def test_bad_input_never_builds_a_queue(bad: Any) -> None:
    before = live_queue_ids()
    with pytest.raises(DescriptorError) as info:
        resolve_descriptor(bad)
    assert not isinstance(info.value, (KeyError, TypeError, AttributeError))
    assert live_queue_ids() == before


# -- D12 canonical JSON ----------------------------------------------------------------------------


@pytest.mark.spec("D12")
def test_to_json_is_canonical() -> None:
    a = QueueDescriptor("q", "local", {"zeta": 1, "alpha": {"b": 2, "a": 1}, "maxsize": 0, "owner_pid": 7}, 1.0)
    b = QueueDescriptor("q", "local", {"owner_pid": 7, "maxsize": 0, "alpha": {"a": 1, "b": 2}, "zeta": 1}, 1.0)
    text = a.to_json()
    assert text == b.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert ": " not in text and ", " not in text and "\n" not in text
    assert text.index('"created_timestamp"') < text.index('"metadata"') < text.index('"queue_id"')


@pytest.mark.spec("D12")
@given(valid_descriptors)
def test_to_json_is_a_fixed_point(desc: QueueDescriptor) -> None:
    text = desc.to_json()
    assert QueueDescriptor.from_json(text).to_json() == text
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


# -- D20, D21 factories ----------------------------------------------------------------------------


D20_SIGNATURES = {
    "create_local_queue": "(maxsize=0, queue_id=None)",
    "create_shm_queue": "(name, maxsize=0, capacity_bytes=None, create=True)",
    "create_sage_queue": "(maxsize=0, name=None, capacity_bytes=None, create=True)",
    "create_ray_queue": "(maxsize=0, name=None)",
    "create_ray_actor_queue": "(actor_name, maxsize=0)",
    "create_rpc_queue": "(host, port, name=None, maxsize=0)",
}


@pytest.mark.spec("D22")
def test_generic_factory_signature() -> None:
    import inspect

    signature = inspect.signature(QueueDescriptor.create)
    plain = signature.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    assert str(plain) == "(queue_type, name=None, maxsize=0, **metadata)"


def _mangle(data: dict[str, Any], how: int, value: Any) -> Any:
    """One way a descriptor gets damaged on the wire: a field or metadata key dropped, replaced or added."""
    data = json.loads(json.dumps(data))
    keys = sorted(data["metadata"])
    if how == 0 and keys:
        del data["metadata"][keys[len(keys) // 2]]
    elif how == 1 and keys:
        data["metadata"][keys[0]] = value
    elif how == 2:
        data["metadata"]["extra"] = value
    elif how == 3:
        data[sorted(data)[int(abs(hash(str(value)))) % len(data)]] = value
    elif how == 4:
        data.pop("metadata")
    elif how == 5:
        return json.dumps(data)[: int(abs(hash(str(value)))) % 80]
    return data


@pytest.mark.spec("D11", "D13")
@given(valid_descriptors, st.integers(0, 5), json_values)
def test_mangled_descriptors_give_only_descriptor_errors(desc: QueueDescriptor, how: int, value: Any) -> None:
    # Regression (issue 8 §1): 28 of 2,000 mangled descriptors raised BackendUnavailable on parse.
    mangled = _mangle(desc.to_dict(), how, value)
    try:
        parsed = QueueDescriptor.parse(mangled)
    except DescriptorError:
        return
    assert QueueDescriptor.from_json(parsed.to_json()) == parsed


@pytest.mark.spec("D20")
@pytest.mark.parametrize(("factory", "expected"), D20_SIGNATURES.items())
def test_factory_signatures_are_the_specified_ones(factory: str, expected: str) -> None:
    import inspect

    signature = inspect.signature(getattr(QueueDescriptor, factory))
    plain = signature.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    assert str(plain) == expected


@pytest.mark.spec("D20")
def test_local_factory() -> None:
    desc = QueueDescriptor.create_local_queue(maxsize=100)
    assert desc.queue_type == "local"
    assert desc.metadata == {"maxsize": 100, "owner_pid": os.getpid()}
    assert isinstance(desc.created_timestamp, float)
    assert QueueDescriptor.create_local_queue(queue_id="mine").queue_id == "mine"


@pytest.mark.spec("D20", "D13")
@pytest.mark.parametrize(
    ("factory", "args", "queue_type"),
    [
        ("create_ray_queue", {"maxsize": 10}, "ray_queue"),
        ("create_ray_queue", {"maxsize": 10, "name": "rq"}, "ray_queue"),
        ("create_ray_actor_queue", {"actor_name": "input_actor"}, "ray_actor"),
        ("create_rpc_queue", {"host": "output_server", "port": 8080}, "rpc"),
        ("create_rpc_queue", {"host": "127.0.0.1", "port": 8080, "name": "out", "maxsize": 5}, "rpc"),
        ("create_shm_queue", {"name": "shared_queue_1"}, "shm"),
        ("create_sage_queue", {"maxsize": 10000}, "sage"),
    ],
)
def test_every_factory_builds_and_only_resolving_fails_with_backend_unavailable(
    factory: str, args: dict[str, Any], queue_type: str
) -> None:
    desc = getattr(QueueDescriptor, factory)(**args)  # whether or not the backend is here (D13)
    assert desc.queue_type == queue_type
    assert QueueDescriptor.from_json(desc.to_json()) == desc
    if QUEUE_STUB_MAPPING.available(queue_type):
        return
    with pytest.raises(BackendUnavailable) as info:
        resolve_descriptor(desc)
    assert isinstance(info.value, ImportError)
    assert info.value.queue_type == queue_type
    assert queue_type in str(info.value)
    assert info.value.missing and info.value.hint


@pytest.mark.spec("D20")
@pytest.mark.parametrize("queue_type", SHM_TYPES or ["shm"])
def test_shm_factories_fill_the_table(queue_type: str) -> None:
    if queue_type not in SHM_TYPES:
        pytest.skip(f"the {queue_type} backend does not import here")
    if queue_type == "shm":
        desc = QueueDescriptor.create_shm_queue("shared_queue_1", maxsize=7, capacity_bytes=4096, create=False)
    else:
        desc = QueueDescriptor.create_sage_queue(maxsize=7, name="shared_queue_1", capacity_bytes=4096, create=False)
    assert desc.queue_id == "shared_queue_1"
    assert desc.metadata == {"shm_name": "shared_queue_1", "maxsize": 7, "capacity_bytes": 4096, "create": False}
    with pytest.raises(DescriptorError, match=r"shm_name|queue_id"):
        if queue_type == "shm":
            QueueDescriptor.create_shm_queue("")
        else:
            QueueDescriptor.create_sage_queue(name="")


@pytest.mark.spec("D21")
def test_generated_names_are_unique_and_typed() -> None:
    ids = {QueueDescriptor.create_local_queue().queue_id for _ in range(500)}
    assert len(ids) == 500
    assert all(re.fullmatch(r"local_[0-9a-f]{16}", i) for i in ids)
    if "sage" in SHM_TYPES:
        names = {QueueDescriptor.create_sage_queue().metadata["shm_name"] for _ in range(100)}
        assert len(names) == 100
        assert all(re.fullmatch(r"sage_[0-9a-f]{16}", n) for n in names)
    if QUEUE_STUB_MAPPING.available("ray_queue"):
        names = {QueueDescriptor.create_ray_queue().queue_id for _ in range(100)}
        assert len(names) == 100
        assert all(re.fullmatch(r"ray_queue_[0-9a-f]{16}", n) for n in names)


@pytest.mark.spec("D6", "D20")
def test_factories_stamp_the_creation_time() -> None:
    import time

    before = time.time()
    desc = QueueDescriptor.create_local_queue()
    assert desc.created_timestamp is not None
    assert before <= desc.created_timestamp <= time.time()
    assert math.isfinite(desc.created_timestamp)
