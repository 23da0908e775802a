"""The registry and resolve_descriptor (spec/descriptor.md R1-R6, R9)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from _helpers import local_meta
from hypothesis import event, given
from hypothesis import strategies as st

from sage_queue import (
    QUEUE_STUB_MAPPING,
    BackendUnavailable,
    DescriptorError,
    IncompatibleQueue,
    InvalidMetadata,
    MetadataField,
    QueueDescriptor,
    QueueExists,
    QueueLike,
    QueueNotFound,
    QueueStub,
    UnknownQueueType,
    create_descriptor_from_existing_queue,
    get_local_queue,
    register_queue_implementation,
    resolve_descriptor,
    unregister_queue_implementation,
)
from sage_queue.backends.local import LocalQueueStub, live_queue_ids
from sage_queue.registry import backend_class, canonical_type

SHM_TYPES = [t for t in ("shm", "sage") if QUEUE_STUB_MAPPING.available(t)]
REACHABILITY_ERRORS = (QueueNotFound, QueueExists, IncompatibleQueue, BackendUnavailable)


@pytest.fixture
def local_handle() -> Iterator[Any]:
    handle = get_local_queue(maxsize=10)
    yield handle
    if not handle.closed:
        handle.destroy()


# -- R1 resolve_descriptor accepts every form ------------------------------------------------------


@pytest.mark.spec("R1")
def test_resolve_accepts_descriptor_dict_str_and_bytes(local_handle: Any) -> None:
    desc = local_handle.descriptor
    forms = [desc, desc.to_dict(), desc.to_json(), desc.to_json().encode(), bytearray(desc.to_json().encode())]
    handles = [resolve_descriptor(form) for form in forms]
    for n, handle in enumerate(handles):
        assert isinstance(handle, LocalQueueStub)
        assert handle.descriptor == desc
        handle.put(n)
    assert [local_handle.get_nowait() for _ in forms] == list(range(len(forms)))
    for handle in handles:
        handle.close()


@pytest.mark.spec("R1")
def test_resolve_validates_before_building() -> None:
    before = live_queue_ids()
    with pytest.raises(InvalidMetadata):
        resolve_descriptor(
            {"queue_id": f"r1-{uuid.uuid4().hex}", "queue_type": "local", "metadata": local_meta(maxsize=-1)}
        )
    assert live_queue_ids() == before


# -- R2 any input: a handle or a documented error, never a hang ------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15,
)
_field_names = st.sampled_from(
    ["version", "queue_id", "queue_type", "metadata", "created_timestamp", "queue-id", "extra"]
)
_types = st.sampled_from(["local", "shm", "sage", "sage_queue", "ray_queue", "ray_actor", "rpc", "nope", ""])


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A valid descriptor dict of some type, then zero to two random edits."""
    queue_type = draw(_types)
    name = f"r2-{uuid.uuid4().hex[:12]}"  # never a name another test uses
    metadata: dict[str, Any] = {"maxsize": draw(st.integers(0, 8))}
    if queue_type in ("shm", "sage", "sage_queue"):
        metadata.update(shm_name=name, capacity_bytes=draw(st.sampled_from([4096, 65536])), create=draw(st.booleans()))
    elif queue_type == "local":
        # This process (a handle), another one (QueueNotFound, R8); the edits below may drop it (D10).
        metadata["owner_pid"] = draw(st.sampled_from([os.getpid(), os.getpid() + 1]))
    data: dict[str, Any] = {"queue_id": name, "queue_type": queue_type, "metadata": metadata}
    if draw(st.booleans()):
        data["version"] = 1
    if draw(st.booleans()):
        data["created_timestamp"] = draw(st.none() | st.floats(min_value=0, max_value=2e9))
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from(["top", "metadata"]))
        where = data if target == "top" or not isinstance(data.get("metadata"), dict) else data["metadata"]
        key = draw(
            _field_names
            if where is data
            else st.sampled_from(["maxsize", "owner_pid", "shm_name", "capacity_bytes", "create", "other"])
        )
        if draw(st.booleans()) and key in where:
            del where[key]
        else:
            where[key] = draw(_json)
    meta = data.get("metadata")
    if isinstance(meta, dict):
        # Keep generated segments small: a valid shm/sage descriptor does create its segment.
        cap = meta.get("capacity_bytes")
        if isinstance(cap, int) and not isinstance(cap, bool) and cap > 1 << 20:
            meta["capacity_bytes"] = 1 << 20
    return data


_garbage = (
    _json
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.dictionaries(_field_names, _json, max_size=6)
    | st.dictionaries(_field_names, _json, max_size=6).map(lambda d: json.dumps(d).encode())
)
# Half near-valid descriptors (so that handles, reachability errors and late checks all get exercised),
# half garbage.
_any_input = st.one_of(near_valid(), near_valid().map(json.dumps), _garbage, _garbage)


def _parse_outcome(value: Any) -> BaseException | None:
    try:
        QueueDescriptor.parse(value)
    except (DescriptorError, BackendUnavailable) as exc:
        return exc
    return None


@pytest.mark.spec("R2", "D11", "E5", "E12")
@pytest.mark.timeout(90)
@given(_any_input)
def test_resolve_any_input_gives_a_handle_or_a_documented_error(value: Any) -> None:
    parse_error = _parse_outcome(value)
    try:
        handle = resolve_descriptor(value)
    except DescriptorError as exc:
        event(type(exc).__name__)
        # Bad input is refused as bad input, by the same check that refuses it when parsed.
        assert isinstance(parse_error, DescriptorError), f"a valid descriptor was refused late: {exc!r}"
        assert type(exc) is type(parse_error)
        return
    except BackendUnavailable as exc:
        event("BackendUnavailable")
        assert not QUEUE_STUB_MAPPING.available(exc.queue_type)
        return
    except (QueueNotFound, QueueExists, IncompatibleQueue) as exc:
        event(type(exc).__name__)
        assert parse_error is None, f"{exc!r} for input that is not a valid descriptor"
        return
    event(f"handle {handle.descriptor.queue_type}")
    try:
        assert parse_error is None
        assert isinstance(handle, QueueStub)  # every built-in backend's handle
        assert handle.descriptor == QueueDescriptor.parse(value)
    finally:
        handle.destroy()  # a valid shm/sage descriptor created its segment: remove it


@pytest.mark.spec("R1", "R2")
@pytest.mark.parametrize("queue_type", ["local", "shm", "sage", "sage_queue", "ray_queue", "ray_actor", "rpc"])
def test_valid_descriptor_of_every_type(queue_type: str) -> None:
    name = f"r2-{uuid.uuid4().hex[:12]}"
    metadata: dict[str, Any] = {"maxsize": 4}
    if queue_type in ("shm", "sage", "sage_queue"):
        metadata.update(shm_name=name, capacity_bytes=65536)
    elif queue_type == "local":
        metadata.update(owner_pid=os.getpid())
    elif queue_type == "rpc":
        metadata.update(host="127.0.0.1", port=5555, name=name)
    else:
        metadata.update(actor_name=name)
    data = {"queue_id": name, "queue_type": queue_type, "metadata": metadata}
    assert QueueDescriptor.from_json(json.dumps(data)).queue_id == name  # parses whether or not available (D13)
    if queue_type.startswith("ray_"):
        pytest.skip("resolved in tests/ray, where one Ray instance serves the whole session")
    with contextlib.ExitStack() as service:
        if QUEUE_STUB_MAPPING.available(canonical_type(queue_type)):
            local_service = getattr(backend_class(queue_type), "local_service", None)
            if local_service is not None:  # rpc: a throw-away server (see stub.py)
                metadata.update(service.enter_context(local_service()))
                data["metadata"] = metadata
        _resolve_use_destroy(queue_type, name, json.dumps(data))


def _resolve_use_destroy(queue_type: str, name: str, text: str) -> None:
    try:
        handle = resolve_descriptor(text)
    except BackendUnavailable as exc:
        assert not QUEUE_STUB_MAPPING.available(exc.queue_type)
        return
    try:
        handle.put({"type": queue_type})
        with resolve_descriptor(handle.descriptor) as second:
            assert second.get(timeout=5) == {"type": queue_type}
    finally:
        handle.destroy()
    assert not [p for p in Path("/dev/shm").glob(f"sageq-*{name}*")], "destroy left the segment behind"


@pytest.mark.spec("R2", "E6")
@pytest.mark.parametrize("queue_type", SHM_TYPES or ["shm"])
def test_valid_descriptor_of_a_missing_segment_is_not_found(queue_type: str) -> None:
    if queue_type not in SHM_TYPES:
        pytest.skip(f"the {queue_type} backend does not import here")
    name = f"r2-{uuid.uuid4().hex}"
    desc = QueueDescriptor(name, queue_type, {"shm_name": name, "create": False})
    with pytest.raises(QueueNotFound, match=name):  # and the message names the missing queue
        resolve_descriptor(desc)


@pytest.mark.spec("R2")
def test_local_with_another_maxsize_is_incompatible(local_handle: Any) -> None:
    desc = local_handle.descriptor
    other = QueueDescriptor(desc.queue_id, "local", {**desc.metadata, "maxsize": 11}, desc.created_timestamp)
    with pytest.raises(IncompatibleQueue, match="maxsize"):
        resolve_descriptor(other)


# -- R3 the mapping, imported lazily ---------------------------------------------------------------


@pytest.mark.spec("R3")
def test_mapping_maps_types_to_classes() -> None:
    assert QUEUE_STUB_MAPPING["local"] is LocalQueueStub
    assert "local" in QUEUE_STUB_MAPPING
    assert {"local", "shm", "sage", "ray_queue", "ray_actor", "rpc"} <= set(QUEUE_STUB_MAPPING)
    assert len(QUEUE_STUB_MAPPING) >= 6
    assert QUEUE_STUB_MAPPING.available("local")
    assert not QUEUE_STUB_MAPPING.available("no-such-type")
    with pytest.raises(KeyError):
        QUEUE_STUB_MAPPING["no-such-type"]
    planned = f"planned_{uuid.uuid4().hex[:8]}"  # known by name and schema, no implementation yet
    register_queue_implementation(planned, None, metadata=[MetadataField("host", str)])
    try:
        assert planned in QUEUE_STUB_MAPPING and not QUEUE_STUB_MAPPING.available(planned)
        with pytest.raises(BackendUnavailable, match=planned):
            QUEUE_STUB_MAPPING[planned]
    finally:
        unregister_queue_implementation(planned)


@pytest.mark.spec("R3")
@pytest.mark.timeout(60)
def test_backends_are_imported_on_first_use_only() -> None:
    script = textwrap.dedent(
        """
        import sys
        import sage_queue
        backends = [m for m in sys.modules if m.startswith("sage_queue.backends.")]
        assert backends == [], backends
        for heavy in ("ray", "zmq", "sage_queue._sage_core", "numpy"):
            assert heavy not in sys.modules, heavy
        assert sage_queue.QUEUE_STUB_MAPPING["local"].__name__ == "LocalQueueStub"
        assert "sage_queue.backends.local" in sys.modules
        assert "sage_queue.backends.shm" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- R4 register_queue_implementation --------------------------------------------------------------


class ColouredQueue:
    """A minimal third-party backend: a queue.Queue per handle and one required metadata key."""

    instances: ClassVar[list[ColouredQueue]] = []

    def __init__(self, descriptor: QueueDescriptor) -> None:
        self.descriptor = descriptor
        self._q: queue.Queue[Any] = queue.Queue()
        ColouredQueue.instances.append(self)

    @classmethod
    def validate_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(metadata.get("colour"), str):
            raise InvalidMetadata("coloured metadata['colour'] must be a string")
        return {**metadata, "checked": True}

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._q.put(item, block, timeout)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self._q.get(block, timeout)

    def put_nowait(self, item: Any) -> None:
        self._q.put_nowait(item)

    def get_nowait(self) -> Any:
        return self._q.get_nowait()

    def empty(self) -> bool:
        return self._q.empty()

    def full(self) -> bool:
        return self._q.full()

    def qsize(self) -> int:
        return self._q.qsize()


@pytest.fixture
def fresh_type() -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:8]}"
    yield name
    if name in QUEUE_STUB_MAPPING:
        unregister_queue_implementation(name)


@pytest.mark.spec("R4")
def test_register_a_class(fresh_type: str) -> None:
    register_queue_implementation(fresh_type, ColouredQueue)
    assert QUEUE_STUB_MAPPING[fresh_type] is ColouredQueue
    desc = QueueDescriptor("q", fresh_type, {"colour": "red"})
    assert desc.metadata == {"colour": "red", "checked": True}  # validate_metadata ran (D10)
    with pytest.raises(InvalidMetadata, match="colour"):
        QueueDescriptor("q", fresh_type, {})
    handle = resolve_descriptor(desc.to_json())
    assert isinstance(handle, ColouredQueue) and isinstance(handle, QueueLike)
    handle.put("x")
    assert handle.get_nowait() == "x"


@pytest.mark.spec("R4")
def test_register_twice_needs_replace(fresh_type: str) -> None:
    register_queue_implementation(fresh_type, ColouredQueue)
    with pytest.raises(ValueError, match="already registered"):
        register_queue_implementation(fresh_type, LocalQueueStub)
    assert QUEUE_STUB_MAPPING[fresh_type] is ColouredQueue
    register_queue_implementation(fresh_type, LocalQueueStub, replace=True)
    assert QUEUE_STUB_MAPPING[fresh_type] is LocalQueueStub
    with pytest.raises(ValueError):
        register_queue_implementation("local", ColouredQueue)
    assert QUEUE_STUB_MAPPING["local"] is LocalQueueStub


@pytest.mark.spec("R4")
def test_register_a_dotted_path(fresh_type: str) -> None:
    register_queue_implementation(fresh_type, "sage_queue.backends.local:LocalQueueStub")
    assert QUEUE_STUB_MAPPING[fresh_type] is LocalQueueStub
    handle = resolve_descriptor(
        {"queue_id": f"r4-{uuid.uuid4().hex}", "queue_type": fresh_type, "metadata": local_meta()}
    )
    try:
        handle.put(1)
        assert handle.get_nowait() == 1
    finally:
        handle.destroy()


@pytest.mark.spec("R4")
def test_register_a_path_that_does_not_import(fresh_type: str) -> None:
    register_queue_implementation(fresh_type, "no_such_module_xyz:Thing")
    assert not QUEUE_STUB_MAPPING.available(fresh_type)
    with pytest.raises(BackendUnavailable, match="no_such_module_xyz"):
        resolve_descriptor({"queue_id": "q", "queue_type": fresh_type})


@pytest.mark.spec("R4")
@pytest.mark.parametrize(
    ("queue_type", "cls", "error"),
    [
        ("", ColouredQueue, ValueError),
        ("sage_queue", ColouredQueue, ValueError),
        ("fine_name", 42, TypeError),
        ("fine_name", ColouredQueue(QueueDescriptor("q", "local", local_meta())), TypeError),
    ],
)
def test_register_refuses_bad_arguments(queue_type: str, cls: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        register_queue_implementation(queue_type, cls)
    assert "fine_name" not in QUEUE_STUB_MAPPING


@pytest.mark.spec("R4", "D4")
def test_unregistered_type_is_unknown_again(fresh_type: str) -> None:
    register_queue_implementation(fresh_type, ColouredQueue)
    unregister_queue_implementation(fresh_type)
    with pytest.raises(UnknownQueueType):
        QueueDescriptor("q", fresh_type, {"colour": "red"})
    with pytest.raises(KeyError):
        unregister_queue_implementation(fresh_type)


# -- R5 entry points: a real installed distribution in a fresh interpreter -------------------------


def _install_dummy_distribution(site: Path) -> None:
    """A distribution on sys.path with a dist-info: what `pip install` leaves, read by importlib.metadata."""
    pkg = site / "dummy_sage_backend"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
        import queue

        from sage_queue import InvalidMetadata


        class DummyQueue:
            def __init__(self, descriptor):
                self.descriptor = descriptor
                self._q = queue.Queue()

            @classmethod
            def validate_metadata(cls, metadata):
                if "flavour" not in metadata:
                    raise InvalidMetadata("dummyq metadata['flavour'] is required")
                return metadata

            def put(self, item, block=True, timeout=None):
                self._q.put(item, block, timeout)

            def get(self, block=True, timeout=None):
                return self._q.get(block, timeout)

            def put_nowait(self, item):
                self._q.put_nowait(item)

            def get_nowait(self):
                return self._q.get_nowait()

            def empty(self):
                return self._q.empty()

            def full(self):
                return self._q.full()

            def qsize(self):
                return self._q.qsize()
        """
        )
    )
    # A schema in a module of its own: the type's descriptors parse without importing the backend (R5, D13).
    (site / "dummy_sage_meta.py").write_text(
        textwrap.dedent(
            """
        from sage_queue import MetadataField, QueueTypeSchema

        SCHEMA = QueueTypeSchema(
            fields=(MetadataField("flavour", str, required=True, doc="taste"),
                    MetadataField("maxsize", int, default=0)),
            name_key="flavour",
            target="dummy_sage_backend:DummyQueue",
        )
        NOWHERE = QueueTypeSchema(fields=(MetadataField("flavour", str, required=True),),
                                  target="dummy_sage_missing_xyz:Q")
        """
        )
    )
    info = site / "dummy_sage_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dummy-sage-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[sage_queue.backends]\n"
        "dummyq = dummy_sage_backend:DummyQueue\n"
        "brokenq = dummy_sage_backend:NoSuchClass\n"
        "local = dummy_sage_backend:DummyQueue\n"
        "schemaq = dummy_sage_meta:SCHEMA\n"
        "nowhereq = dummy_sage_meta:NOWHERE\n"
    )


@pytest.mark.spec("R5", "D4", "D13", "D22")
@pytest.mark.timeout(60)
def test_entry_point_backends(tmp_path: Path) -> None:
    _install_dummy_distribution(tmp_path)
    script = textwrap.dedent(
        """
        import sys
        import sage_queue as sq
        from sage_queue.backends.local import LocalQueueStub

        local = sq.resolve_descriptor(sq.QueueDescriptor.create_local_queue())
        assert "dummy_sage_backend" not in sys.modules, "entry point loaded before it was needed"
        assert "importlib.metadata" not in sys.modules, "entry points read although every type was found"

        handle = sq.resolve_descriptor('{"queue_id": "e1", "queue_type": "dummyq", "metadata": {"flavour": "x"}}')
        assert type(handle).__module__ == "dummy_sage_backend", type(handle)
        handle.put("through the entry point")
        assert handle.get() == "through the entry point"
        assert "dummyq" in sq.QUEUE_STUB_MAPPING and "dummyq" in list(sq.QUEUE_STUB_MAPPING)

        try:
            sq.QueueDescriptor("e2", "dummyq", {})
        except sq.InvalidMetadata as exc:
            assert "flavour" in str(exc)
        else:
            raise AssertionError("the entry point class's validate_metadata was not used")

        # An entry point that does not load gives no schema: parsing refuses the type (D4, D13),
        # resolving names the missing piece.
        try:
            sq.QueueDescriptor("e3", "brokenq")
        except sq.UnknownQueueType as exc:
            assert "NoSuchClass" in str(exc), exc
            assert isinstance(exc.__cause__, sq.BackendUnavailable)
        else:
            raise AssertionError("a broken entry point parsed")
        try:
            sq.resolve_descriptor({"queue_id": "e3", "queue_type": "brokenq"})
        except sq.BackendUnavailable as exc:
            assert "NoSuchClass" in str(exc), exc
        else:
            raise AssertionError("a broken entry point resolved")

        # An entry point naming a schema: parse, validate and create without importing the backend.
        del sys.modules["dummy_sage_backend"]
        desc = sq.QueueDescriptor.create("schemaq", "vanilla", maxsize=3)
        assert desc.metadata == {"flavour": "vanilla", "maxsize": 3}, desc.metadata
        try:
            sq.QueueDescriptor.from_dict({"queue_id": "e4", "queue_type": "schemaq"})
        except sq.InvalidMetadata as exc:
            assert "flavour" in str(exc)
        else:
            raise AssertionError("the entry point's schema was not used")
        assert "dummy_sage_backend" not in sys.modules, "parsing imported the backend"
        handle = sq.resolve_descriptor(desc)
        assert type(handle).__module__ == "dummy_sage_backend", type(handle)
        nowhere = sq.QueueDescriptor.create("nowhereq", flavour="x")  # parses: its schema is here
        try:
            sq.resolve_descriptor(nowhere)
        except sq.BackendUnavailable as exc:
            assert "dummy_sage_missing_xyz" in str(exc), exc
        else:
            raise AssertionError("a missing implementation resolved")

        # A built-in type is never taken over by an entry point of the same name.
        assert sq.QUEUE_STUB_MAPPING["local"] is LocalQueueStub
        local.destroy()
        print("ok")
        """
    )
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- R6 create_descriptor_from_existing_queue ------------------------------------------------------


@pytest.mark.spec("R6")
def test_describe_a_handle(local_handle: Any) -> None:
    desc = local_handle.descriptor
    assert create_descriptor_from_existing_queue(local_handle, "local") == desc
    assert create_descriptor_from_existing_queue(local_handle, "local", maxsize=10) == desc
    with pytest.raises(InvalidMetadata, match="maxsize"):
        create_descriptor_from_existing_queue(local_handle, "local", maxsize=11)
    assert create_descriptor_from_existing_queue(local_handle, "local", owner_pid=os.getpid()) == desc
    with pytest.raises(InvalidMetadata, match="owner_pid"):
        create_descriptor_from_existing_queue(local_handle, "local", owner_pid=os.getpid() + 1)
    if SHM_TYPES:
        with pytest.raises(InvalidMetadata, match="local"):
            create_descriptor_from_existing_queue(local_handle, SHM_TYPES[0])
    with pytest.raises(UnknownQueueType):
        create_descriptor_from_existing_queue(local_handle, "nope")


@pytest.mark.spec("R6")
def test_seed_scenario_one_in_process() -> None:
    # The seed's own lines, verbatim in spirit: a handle, then its descriptor, then a second handle.
    q = get_local_queue(maxsize=100)
    try:
        descriptor = create_descriptor_from_existing_queue(q, "local", maxsize=100)
        received = QueueDescriptor.from_json(descriptor.to_json())
        connection = resolve_descriptor(received)
        q.put({"job": 1})
        assert connection.get(timeout=1) == {"job": 1}
    finally:
        q.destroy()


@pytest.mark.spec("R6")
def test_adopt_a_plain_queue() -> None:
    raw: queue.Queue[Any] = queue.Queue(maxsize=4)
    raw.put("already there")
    desc = create_descriptor_from_existing_queue(raw, "local", purpose="adopted")
    assert desc.queue_type == "local" and desc.metadata["maxsize"] == 4
    assert desc.metadata["purpose"] == "adopted"
    handle = resolve_descriptor(desc.to_json())
    try:
        assert handle.get_nowait() == "already there"
        handle.put("via handle")
        assert raw.get_nowait() == "via handle"
        raw.put("via raw")
        assert handle.get(timeout=1) == "via raw"
        assert create_descriptor_from_existing_queue(raw, "local") != desc  # a new queue_id each time
    finally:
        handle.destroy()


@pytest.mark.spec("R6", "E4")
@pytest.mark.parametrize(
    "thing",
    [queue.LifoQueue(), queue.PriorityQueue(), queue.SimpleQueue(), [], "a queue", None],
    ids=["LifoQueue", "PriorityQueue", "SimpleQueue", "list", "str", "None"],
)
def test_adopt_refuses_what_is_not_a_fifo_queue(thing: Any) -> None:
    before = live_queue_ids()
    with pytest.raises(TypeError):
        create_descriptor_from_existing_queue(thing, "local")
    assert live_queue_ids() == before


@pytest.mark.spec("R6", "E4")
@pytest.mark.timeout(30)
def test_adopt_refuses_a_multiprocessing_queue() -> None:
    import multiprocessing

    mp_queue = multiprocessing.get_context("spawn").Queue()
    try:
        with pytest.raises(TypeError):
            create_descriptor_from_existing_queue(mp_queue, "local")
    finally:
        mp_queue.close()
        mp_queue.join_thread()


@pytest.mark.spec("R6", "R8")
def test_adoption_sets_owner_pid_itself() -> None:
    raw: queue.Queue[Any] = queue.Queue()
    desc = create_descriptor_from_existing_queue(raw, "local", maxsize=0)
    try:
        assert desc.metadata["owner_pid"] == os.getpid()
        assert QueueDescriptor.from_json(desc.to_json()).metadata["owner_pid"] == os.getpid()
    finally:
        resolve_descriptor(desc).destroy()


@pytest.mark.spec("R6")
@pytest.mark.parametrize("given", ["this process", "another process", 0, "me"])
def test_adopt_refuses_a_given_owner_pid(given: Any) -> None:
    # Adoption registers the queue in this process, so this process is its owner; a caller's
    # owner_pid, even this process's own, is refused rather than trusted or silently replaced.
    owner_pid = {"this process": os.getpid(), "another process": os.getpid() + 1}.get(given, given)
    raw: queue.Queue[Any] = queue.Queue()
    raw.put("untouched")
    before = live_queue_ids()
    with pytest.raises(InvalidMetadata, match="owner_pid"):
        create_descriptor_from_existing_queue(raw, "local", owner_pid=owner_pid)
    assert live_queue_ids() == before
    assert raw.get_nowait() == "untouched" and raw.empty()


@pytest.mark.spec("R6")
def test_adopt_with_disagreeing_maxsize() -> None:
    before = live_queue_ids()
    with pytest.raises(InvalidMetadata, match="maxsize"):
        create_descriptor_from_existing_queue(queue.Queue(maxsize=3), "local", maxsize=5)
    assert live_queue_ids() == before


# -- R9 get_local_queue ----------------------------------------------------------------------------


@pytest.mark.spec("R9")
def test_get_local_queue_gives_a_new_queue_each_time() -> None:
    a, b = get_local_queue(maxsize=2), get_local_queue()
    try:
        assert isinstance(a, LocalQueueStub) and isinstance(a, QueueLike)
        assert a.maxsize == 2 and b.maxsize == 0
        assert a.descriptor.queue_id != b.descriptor.queue_id
        a.put(1)
        assert b.empty() and a.qsize() == 1
        a.put(2)
        assert a.full()
        with pytest.raises(queue.Full):
            a.put_nowait(3)
    finally:
        a.destroy()
        b.destroy()
    with pytest.raises(InvalidMetadata):
        get_local_queue(maxsize=-1)


# -- D22 one generic factory; D4 types known by schema only ----------------------------------------


@pytest.mark.spec("D22", "D21")
@pytest.mark.parametrize(
    ("queue_type", "name_key"),
    [
        ("local", None),
        ("shm", "shm_name"),
        ("sage", "shm_name"),
        ("sage_queue", "shm_name"),
        ("ray_queue", "actor_name"),
        ("ray_actor", "actor_name"),
        ("rpc", "name"),
    ],
)
def test_generic_factory_for_every_builtin_type(queue_type: str, name_key: str | None) -> None:
    extra: dict[str, Any] = {"host": "h", "port": 1} if queue_type == "rpc" else {}
    named = QueueDescriptor.create(queue_type, "jobs", 7, **extra)
    canonical = "sage" if queue_type == "sage_queue" else queue_type
    assert (named.queue_id, named.queue_type, named.metadata["maxsize"]) == ("jobs", canonical, 7)
    if name_key is not None:
        assert named.metadata[name_key] == "jobs"
    else:
        assert named.metadata["owner_pid"] == os.getpid()  # local's creation hook
    generated = QueueDescriptor.create(queue_type, **extra)
    assert generated.queue_id.startswith(f"{canonical}_") and len(generated.queue_id) == len(canonical) + 17
    if name_key is not None:
        assert generated.metadata[name_key] == generated.queue_id
        # The name given as the type's own key is the name.
        assert QueueDescriptor.create(queue_type, **{name_key: "viakey"}, **extra).queue_id == "viakey"
    assert QueueDescriptor.from_json(named.to_json()) == named
    with pytest.raises(InvalidMetadata, match="maxsize"):
        QueueDescriptor.create(queue_type, "jobs", -1, **extra)
    with pytest.raises(UnknownQueueType):
        QueueDescriptor.create("no_such_type_xyz", "jobs")


@pytest.mark.spec("D20", "D22")
def test_seed_factories_keep_their_call_shapes() -> None:
    # Positional and keyword forms of the seed's factories give what create() gives.
    local = QueueDescriptor.create_local_queue(3, "lid")
    assert (local.queue_id, local.metadata["maxsize"]) == ("lid", 3)
    assert QueueDescriptor.create_local_queue(maxsize=3, queue_id="lid").metadata == local.metadata
    shm = QueueDescriptor.create_shm_queue("sn", 5, 4096, False)
    assert shm.metadata == {"shm_name": "sn", "maxsize": 5, "capacity_bytes": 4096, "create": False}
    assert (
        QueueDescriptor.create_shm_queue(name="sn", maxsize=5, capacity_bytes=4096, create=False).metadata
        == shm.metadata
    )
    sage = QueueDescriptor.create_sage_queue(5, "gn", 4096, False)
    assert sage.metadata == {"shm_name": "gn", "maxsize": 5, "capacity_bytes": 4096, "create": False}
    assert QueueDescriptor.create_sage_queue(maxsize=5).metadata["capacity_bytes"] == 16 << 20
    actor = QueueDescriptor.create_ray_actor_queue("act", 2)
    assert (actor.queue_id, actor.metadata) == ("act", {"actor_name": "act", "maxsize": 2})
    rq = QueueDescriptor.create_ray_queue(4, "rq")
    assert (rq.queue_id, rq.metadata) == ("rq", {"actor_name": "rq", "maxsize": 4})
    rpc = QueueDescriptor.create_rpc_queue("host", 80, "nm", 9)
    assert (rpc.queue_id, rpc.metadata) == ("nm", {"host": "host", "port": 80, "name": "nm", "maxsize": 9})
    assert QueueDescriptor.create_rpc_queue(host="host", port=80, name="nm", maxsize=9).metadata == rpc.metadata


class _EndpointQueue(LocalQueueStub):
    """A third-party type with required metadata: a local queue that insists on an ``endpoint``."""

    queue_type: ClassVar[str] = "local"


def _endpoint_schema(hook: bool) -> Any:
    from sage_queue import MetadataField, QueueTypeSchema
    from sage_queue.metadata import BUILTIN_SCHEMAS

    def fill(queue_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        return {"endpoint": f"mem://{queue_id}", "owner_pid": os.getpid(), **metadata}

    fields = (*BUILTIN_SCHEMAS["local"].fields, MetadataField("endpoint", str, required=True, doc="where"))
    return QueueTypeSchema(fields=fields, create_hook=fill if hook else BUILTIN_SCHEMAS["local"].create_hook)


@pytest.mark.spec("D22", "R4")
def test_generic_factory_and_the_kit_for_a_third_party_type_with_required_metadata(fresh_type: str) -> None:
    # Issue 8 §2: `--backend mytype` failed for a third-party type with required metadata.
    from conformance.target import TargetError, registered_target, registered_types

    register_queue_implementation(fresh_type, _EndpointQueue, metadata=_endpoint_schema(hook=True))
    desc = QueueDescriptor.create(fresh_type, "ep", maxsize=2)
    assert desc.metadata["endpoint"] == "mem://ep"
    assert fresh_type in registered_types()
    target = registered_target(fresh_type)
    handle = target.factory(2)
    try:
        handle.put("through the kit's factory")
        assert handle.get_nowait() == "through the kit's factory"
    finally:
        assert target.cleanup is not None
        target.cleanup()
    # Without a hook that fills it, the required key must be given: the kit says so up front...
    register_queue_implementation(fresh_type, _EndpointQueue, metadata=_endpoint_schema(hook=False), replace=True)
    with pytest.raises(InvalidMetadata, match="endpoint"):
        QueueDescriptor.create(fresh_type)
    with pytest.raises(TargetError, match="endpoint"):
        registered_target(fresh_type)
    # ... and accepts it as metadata for every queue it makes.
    target = registered_target(fresh_type, {"endpoint": "mem://given"})
    handle = target.factory(0)
    assert handle.descriptor.metadata["endpoint"] == "mem://given"
    assert target.cleanup is not None
    target.cleanup()


@pytest.mark.spec("D4", "D13", "R4")
def test_a_type_known_by_schema_only_parses_and_fails_only_at_resolve(fresh_type: str) -> None:
    from sage_queue import MetadataField

    register_queue_implementation(fresh_type, None, metadata=[MetadataField("region", str, required=True)])
    desc = QueueDescriptor.from_json(
        json.dumps({"queue_id": "q", "queue_type": fresh_type, "metadata": {"region": "eu", "extra": [1]}})
    )
    assert QueueDescriptor.from_json(desc.to_json()) == desc and desc.metadata["extra"] == [1]  # D7
    with pytest.raises(InvalidMetadata, match="region"):
        QueueDescriptor("q", fresh_type, {})
    assert not QUEUE_STUB_MAPPING.available(fresh_type)
    with pytest.raises(BackendUnavailable, match="name and schema only"):
        resolve_descriptor(desc)
    with pytest.raises(ValueError, match="schema"):
        register_queue_implementation(f"{fresh_type}_x", None)


@pytest.mark.spec("D4", "D13")
def test_a_class_validated_type_whose_class_does_not_import_is_refused_at_parse(fresh_type: str) -> None:
    register_queue_implementation(fresh_type, "sage_queue_no_such_module_xyz:Q")
    with pytest.raises(UnknownQueueType, match="cannot be imported") as info:
        QueueDescriptor.from_dict({"queue_id": "q", "queue_type": fresh_type})
    assert isinstance(info.value.__cause__, BackendUnavailable)
    with pytest.raises(BackendUnavailable, match="sage_queue_no_such_module_xyz"):
        resolve_descriptor({"queue_id": "q", "queue_type": fresh_type})


@pytest.mark.spec("D22")
def test_every_list_of_types_comes_from_the_registry(fresh_type: str) -> None:
    from sage_queue.demo import all_types
    from sage_queue.protocol import CROSS_PROCESS
    from stress.backends import backends_for, descriptor_factory, harness_backends
    from stress.backends import unavailable_reason as harness_reason

    class CrossProcessQueue(ColouredQueue):
        capabilities: ClassVar[frozenset[str]] = frozenset({CROSS_PROCESS})

        @classmethod
        def validate_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
            return {**metadata, "checked": True}

    register_queue_implementation(fresh_type, CrossProcessQueue)
    assert fresh_type in all_types()  # the demo
    assert fresh_type in harness_backends() and fresh_type in backends_for("all")  # stress and bench
    assert harness_reason(fresh_type) is None
    assert "local" not in harness_backends() and "one process" in (harness_reason("local") or "")
    desc = descriptor_factory(fresh_type, maxsize=3, prefix="reg")()
    assert desc.queue_type == fresh_type and desc.queue_id.startswith("reg-")
    assert desc.metadata == {"maxsize": 3, "checked": True}  # made by create(), checked by the class
