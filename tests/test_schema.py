"""spec/descriptor.schema.json and the Python validation agree (D1-D6, D10).

For dicts near the descriptor's shape, of every built-in type (all parse without their backend,
D13), the schema accepts exactly what ``QueueDescriptor.from_dict`` accepts. Two things the schema cannot
say are kept out of the comparison and pinned by their own tests below: JSON Schema calls 1.0 an
integer, and JSON has no infinities (Python's ``json`` reads ``Infinity``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from sage_queue import MAXSIZE_MAX, QUEUE_STUB_MAPPING, DescriptorError, InvalidMetadata, QueueDescriptor
from sage_queue.metadata import BUILTIN_SCHEMAS

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "spec" / "descriptor.schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

BUILTIN_TYPES = ["local", "shm", "sage", "ray_queue", "ray_actor", "rpc"]
TYPES = [*BUILTIN_TYPES, "sage_queue"]  # parsing needs no backend (D13): every type, available or not
SHM_LIKE = ["shm", "sage", "sage_queue"]


def schema_accepts(data: Any) -> bool:
    return bool(VALIDATOR.is_valid(data))


def code_accepts(data: Any) -> bool:
    try:
        QueueDescriptor.from_dict(data)
    except DescriptorError:
        return False
    return True


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


# -- strategies: each field valid or invalid in the ways that matter -------------------------------

_non_integral_floats = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
_ints = st.sampled_from([-1, 0, 1, 63, 64, 4096, 65535, 65536, 2**31, 2**40, 2**63 - 1, 2**63, 2**64]) | st.integers(
    -5, 2**41
)
_names = st.sampled_from(["q1", "a.b-c_d", "x" * 200, "x" * 201, "", "a/b", "a b", "ok\n", "ü"]) | st.text(
    "ab1_.-/ \n", min_size=0, max_size=6
)
_scalars = st.one_of(st.none(), st.booleans(), _ints, _non_integral_floats, _names)
_json = st.recursive(
    _scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6
)
_queue_ids = st.one_of(
    st.text(min_size=0, max_size=8),
    st.sampled_from(["q", "a" * 255, "a" * 256, "ok\n", "\x00", "tab\t", "del\x7f", "\u2028", "☃"]),
    st.integers(),
    st.none(),
)
_timestamps = st.one_of(
    st.none(),
    st.floats(min_value=-10, max_value=2e9, allow_nan=False),
    st.integers(-5, 2**53),
    st.booleans(),
    st.text(max_size=3),
)
_versions = st.sampled_from([1, 0, 2, -1, "1", None, True, False, 1.5, [1]])


@st.composite
def _metadata(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.none(), st.lists(_scalars, max_size=2), _scalars))
    keys = draw(
        st.sets(
            st.sampled_from(
                [
                    "maxsize",
                    "shm_name",
                    "capacity_bytes",
                    "create",
                    "other",
                    "actor_name",
                    "namespace",
                    "host",
                    "port",
                    "name",
                ]
            )
        )
    )
    if draw(st.booleans()):  # required for local: present about half the time
        keys.add("owner_pid")
    metadata: dict[str, Any] = {}
    for key in keys:
        if key in ("shm_name", "actor_name", "namespace", "host", "name") and draw(st.booleans()):
            metadata[key] = draw(_names)
        elif key == "create" and draw(st.booleans()):
            metadata[key] = draw(st.booleans())
        elif key == "owner_pid" and draw(st.integers(0, 2)):
            # Mostly a plausible pid (so that local descriptors get accepted), at times 0 or 1.
            metadata[key] = draw(st.integers(0, 2**31) | st.sampled_from([0, 1]))
        elif key in ("maxsize", "capacity_bytes", "port") and draw(st.booleans()):
            metadata[key] = draw(_ints)  # an integer, in range or just out of it
        else:
            metadata[key] = draw(_json)
    capacity = metadata.get("capacity_bytes")
    if isinstance(capacity, int) and not isinstance(capacity, bool) and (0 < capacity < 1024 or capacity > 2**31):
        # The backends narrow the table's "> 0" (NARROWED_CAPACITY, pinned by its own test below).
        metadata["capacity_bytes"] = 4096
    return metadata


@st.composite
def near_descriptors(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if draw(st.integers(0, 5)):
        data["queue_id"] = draw(_queue_ids) if draw(st.integers(0, 2)) == 0 else draw(st.text(min_size=1, max_size=8))
    if draw(st.integers(0, 9)):
        data["queue_type"] = draw(st.sampled_from(TYPES)) if draw(st.integers(0, 9)) else draw(_scalars)
    if draw(st.booleans()):
        data["version"] = draw(_versions) if draw(st.integers(0, 2)) == 0 else 1
    if draw(st.integers(0, 5)):
        data["metadata"] = draw(_metadata())
    if draw(st.booleans()):
        data["created_timestamp"] = draw(_timestamps)
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.sampled_from(["extra", "queueId", "Metadata"]))] = draw(_scalars)
    return data


@pytest.mark.spec("D1", "D2", "D3", "D5", "D6", "D10")
@pytest.mark.timeout(120)
@given(near_descriptors())
def test_schema_and_code_agree(data: dict[str, Any]) -> None:
    if isinstance(data.get("queue_type"), str) and data["queue_type"] not in TYPES:
        event("queue_type outside the schema's per-type part")
        return
    schema_says, code_says = schema_accepts(data), code_accepts(data)
    event(f"accepted={schema_says}")
    if data.get("queue_type") == "local":
        metadata = data.get("metadata")
        has_owner = isinstance(metadata, dict) and "owner_pid" in metadata
        event(f"local, owner_pid {'present' if has_owner else 'absent'}, accepted={schema_says}")
    assert schema_says == code_says, f"schema says {schema_says}, code says {code_says} for {data!r}"


@pytest.mark.spec("D1", "D10", "D22")
@pytest.mark.parametrize("queue_type", TYPES)
def test_every_factory_output_is_schema_valid(queue_type: str) -> None:
    extra = {"host": "localhost", "port": 5555} if queue_type == "rpc" else {}
    for desc in (
        QueueDescriptor.create(queue_type, maxsize=3, **extra),
        QueueDescriptor.create(queue_type, "schema_check", MAXSIZE_MAX, **extra),
    ):
        VALIDATOR.validate(desc.to_dict())
        VALIDATOR.validate(json.loads(desc.to_json()))


# -- boundaries named explicitly -------------------------------------------------------------------


def _local(**fields: Any) -> dict[str, Any]:
    """A valid local descriptor (owner_pid is required) with ``fields`` replacing its parts."""
    return {"queue_id": "q", "queue_type": "local", "metadata": {"owner_pid": 1}, **fields}


BOUNDARIES = [
    _local(),
    {"queue_id": "q", "queue_type": "local"},  # no metadata, so no owner_pid
    _local(metadata={}),
    _local(metadata={"maxsize": 0}),
    _local(metadata={"owner_pid": None}),
    _local(metadata={"owner_pid": True}),
    _local(metadata={"owner_pid": "1"}),
    _local(metadata={"owner_pid": 1.5}),
    _local(metadata={"owner_pid": -1}),
    _local(metadata={"owner_pid": 2**31, "other": [1]}),
    _local(queue_id="a" * 255),
    _local(queue_id="a" * 256),
    _local(queue_id=""),
    _local(queue_id="ends with newline\n"),  # Python's re lets "$" match before it: the schema must not
    _local(queue_id="\x7f"),
    _local(version=1),
    _local(version=2),
    _local(version=True),
    _local(metadata=None),
    _local(metadata={"maxsize": None, "owner_pid": 1}),
    _local(metadata={"maxsize": 0, "owner_pid": 1}),
    _local(metadata={"owner_pid": 0}),
    _local(metadata={"maxsize": -1, "owner_pid": 1}),
    _local(metadata={"maxsize": True, "owner_pid": 1}),
    _local(created_timestamp=0),
    _local(created_timestamp=-0.5),
    _local(created_timestamp=True),
    _local(extra=1),
]
for _t in SHM_LIKE:
    BOUNDARIES += [
        {"queue_id": "q", "queue_type": _t, "metadata": {"shm_name": "ok"}},
        {"queue_id": "q", "queue_type": _t},
        {"queue_id": "q", "queue_type": _t, "metadata": None},
        {"queue_id": "q", "queue_type": _t, "metadata": {"shm_name": "ok\n"}},
        {"queue_id": "q", "queue_type": _t, "metadata": {"shm_name": "x" * 200}},
        {"queue_id": "q", "queue_type": _t, "metadata": {"shm_name": "x" * 201}},
        {"queue_id": "q", "queue_type": _t, "metadata": {"shm_name": "ok", "create": None}},
        {"queue_id": "q", "queue_type": _t, "metadata": {"shm_name": "ok", "capacity_bytes": 0}},
        {"queue_id": "q", "queue_type": _t, "metadata": {"shm_name": "ok", "capacity_bytes": 4096}},
    ]


for _t in TYPES:
    # D14: every type's maxsize is an int in [0, 2**63 - 1], in the schema and in the code.
    _meta = {
        "local": {"owner_pid": 1},
        "ray_queue": {"actor_name": "a"},
        "ray_actor": {"actor_name": "a"},
        "rpc": {"host": "h", "port": 1, "name": "n"},
    }.get(_t, {"shm_name": "ok"})
    for _maxsize in (0, MAXSIZE_MAX, MAXSIZE_MAX + 1, 2**64, -1):
        BOUNDARIES.append({"queue_id": "q", "queue_type": _t, "metadata": {**_meta, "maxsize": _maxsize}})
for _t in ("ray_queue", "ray_actor"):
    BOUNDARIES += [
        {"queue_id": "q", "queue_type": _t, "metadata": {}},
        {"queue_id": "q", "queue_type": _t, "metadata": {"actor_name": ""}},
        {"queue_id": "q", "queue_type": _t, "metadata": {"actor_name": "a", "namespace": "ns"}},
        {"queue_id": "q", "queue_type": _t, "metadata": {"actor_name": "a", "namespace": 1}},
    ]
for _port in (-1, 0, 65535, 65536, "80", True):
    BOUNDARIES.append({"queue_id": "q", "queue_type": "rpc", "metadata": {"host": "h", "port": _port, "name": "n"}})
BOUNDARIES += [
    {"queue_id": "q", "queue_type": "rpc", "metadata": {"port": 1, "name": "n"}},
    {"queue_id": "q", "queue_type": "rpc", "metadata": {"host": "h", "port": 1}},
    {"queue_id": "q", "queue_type": "rpc", "metadata": {"host": "", "port": 1, "name": "n"}},
]


@pytest.mark.spec("D1", "D2", "D3", "D6", "D10")
@pytest.mark.parametrize("data", BOUNDARIES, ids=lambda d: json.dumps(d)[:60])
def test_schema_and_code_agree_at_the_boundaries(data: dict[str, Any]) -> None:
    assert schema_accepts(data) == code_accepts(data)


# Each backend's capacity_bytes range is in the descriptor.md table and in the schema; the
# backends' own MIN/MAX constants must agree with both, at and around each bound.
def _backend_capacity(queue_type: str) -> tuple[int, int]:
    """The backend's own [MIN_CAPACITY_BYTES, MAX_CAPACITY_BYTES]."""
    import importlib

    module = importlib.import_module(f"sage_queue.backends.{'sage' if queue_type == 'sage_queue' else queue_type}")
    return module.MIN_CAPACITY_BYTES, module.MAX_CAPACITY_BYTES


_shm_capacity_cases = []
for _t in SHM_LIKE or ["shm"]:
    try:
        low, high = _backend_capacity(_t)
    except ImportError:
        continue
    for _cap in sorted({1, 63, 1024, 2**31 + 1, low - 1, low, high, high + 1} - {0}):
        _shm_capacity_cases.append(pytest.param(_t, _cap, id=f"{_t}-{_cap}"))


@pytest.mark.spec("D10")
@pytest.mark.parametrize(("queue_type", "capacity"), _shm_capacity_cases)
def test_capacity_bytes_range_agrees(queue_type: str, capacity: int) -> None:
    if not QUEUE_STUB_MAPPING.available(queue_type):
        pytest.skip(f"the {queue_type} backend does not import here")
    data = {"queue_id": "q", "queue_type": queue_type, "metadata": {"shm_name": "q", "capacity_bytes": capacity}}
    assert schema_accepts(data) == code_accepts(data)


@pytest.mark.spec("D10")
@pytest.mark.parametrize("queue_type", ["shm", "sage"])
def test_capacity_default_agrees_with_the_backend(queue_type: str) -> None:
    # The leaf table restates each backend's default so that parsing never imports the backend.
    if not QUEUE_STUB_MAPPING.available(queue_type):
        pytest.skip(f"the {queue_type} backend does not import here")
    import importlib

    module = importlib.import_module(f"sage_queue.backends.{queue_type}")
    capacity = next(f for f in BUILTIN_SCHEMAS[queue_type].fields if f.name == "capacity_bytes")
    assert capacity.default == module.DEFAULT_CAPACITY_BYTES
    assert QueueDescriptor.create(queue_type).metadata["capacity_bytes"] == module.DEFAULT_CAPACITY_BYTES


@pytest.mark.spec("D14")
@pytest.mark.parametrize("queue_type", BUILTIN_TYPES)
def test_maxsize_has_a_documented_bound(queue_type: str) -> None:
    # Regression (issue 9 item 9): 2**64 used to be accepted; sage packed it with "K" and wrapped
    # to 0 (unbounded), shm failed with struct.error at resolve. Now refused when built or parsed.
    extra = {"host": "h", "port": 1} if queue_type == "rpc" else {}
    assert QueueDescriptor.create(queue_type, maxsize=MAXSIZE_MAX, **extra).metadata["maxsize"] == MAXSIZE_MAX
    for bad in (MAXSIZE_MAX + 1, 2**64, 2**64 + 5, -1):
        with pytest.raises(InvalidMetadata, match=r"maxsize.*between 0 and 9223372036854775807|maxsize.*>= 0"):
            QueueDescriptor.create(queue_type, maxsize=bad, **extra)
        good = QueueDescriptor.create(queue_type, maxsize=0, **extra).to_dict()
        good["metadata"]["maxsize"] = bad
        with pytest.raises(InvalidMetadata, match="maxsize"):
            QueueDescriptor.from_dict(good)


# -- what the schema cannot express ----------------------------------------------------------------


def test_integral_floats_are_integers_to_json_schema_only() -> None:
    # JSON Schema defines 1.0 as an integer; the library refuses a float where the table says int.
    # A JSON writer that turns ints into 1.0 therefore passes the schema and fails the library.
    for metadata in ({"maxsize": 1.0, "owner_pid": 1}, {"owner_pid": 1.0}):
        data = _local(metadata=metadata)
        assert schema_accepts(data)
        assert not code_accepts(data)
        assert code_accepts(_local(metadata={key: int(value) for key, value in metadata.items()}))


def test_infinite_timestamps_are_not_json() -> None:
    # Standard JSON has no Infinity; Python's json module reads it anyway. The library refuses it.
    text = '{"queue_id": "q", "queue_type": "local", "metadata": {"owner_pid": 1}, "created_timestamp": Infinity}'
    data = json.loads(text)
    assert math.isinf(data["created_timestamp"])
    assert not code_accepts(data)
    with pytest.raises(DescriptorError, match="created_timestamp"):
        QueueDescriptor.from_json(text)
    assert code_accepts({**data, "created_timestamp": 1e300})  # the same descriptor, finite: accepted
