"""Who may attach to a named segment (spec/segments.md SEG1-SEG3, spec/errors.md E14).

/dev/shm is world-writable and items are unpickled from the segment: a segment that
another user could have written must never be attached. These tests use a real second
uid (``nobody``, 65534), so the ones that need to change owners or become another user
are skipped unless the suite runs as root.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sage_queue import QueueDescriptor, QueuePermissionError, _segment, resolve_descriptor
from sage_queue.backends import shm

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="changing a file's owner and becoming another user (uid 65534) need root"
)


@pytest.fixture
def names() -> Iterator[list[tuple[str, str]]]:
    """(kind, name) of every segment a test makes; all removed afterwards."""
    made: list[tuple[str, str]] = []
    yield made
    for kind, name in made:
        path = _segment.segment_path(kind, name)
        if os.path.islink(path):
            os.unlink(path)
        else:
            _segment.unlink(kind, name)


def _new(names: list[tuple[str, str]], kind: str = "shm") -> tuple[str, QueueDescriptor]:
    name = f"t-trust-{uuid.uuid4().hex[:12]}"
    names.append((kind, name))
    if kind == "shm":
        return name, QueueDescriptor.create_shm_queue(name, capacity_bytes=4096)
    return name, QueueDescriptor.from_dict(
        {"queue_type": "sage", "queue_id": name, "metadata": {"shm_name": name, "capacity_bytes": 4096}}
    )


def _attach_only(desc: QueueDescriptor) -> QueueDescriptor:
    data = desc.to_dict()
    data["metadata"] = {**data["metadata"], "create": False}
    return QueueDescriptor.from_dict(data)


def _as_nobody(work: Callable[[], str], timeout: float = 30.0) -> str:
    """Run ``work`` in a forked child that became uid/gid 65534; return what it returned.

    Fork without exec: the interpreter lives under /root (mode 0700), which ``nobody``
    may not execute, so a ``subprocess`` with ``preexec_fn=os.setuid`` cannot start it.
    Everything the child needs is imported before the fork for the same reason.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = work()
        except BaseException as exc:  # report, never run pytest's machinery in the child
            result = f"child error {type(exc).__name__}: {exc}"
        os.write(write_end, result.encode()[:4000])
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        out = os.read(read_end, 4096).decode() if ready else "timeout"
    finally:
        os.close(read_end)
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
    return out


class _MakesDirectory:
    """An item whose unpickling creates a directory: proof that attacker data was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


@needs_root
@pytest.mark.spec("SEG1", "SEG2", "SEG4", "E14")
def test_a_queue_planted_by_another_user_is_never_unpickled(names: list[tuple[str, str]], tmp_path: Path) -> None:
    # The attack of issue 9: another local user creates the name first, with a valid header,
    # a crafted pickle and mode 0666, and waits for the victim to attach and get.
    name, desc = _new(names)
    marker = str(tmp_path / "pwned")
    os.chmod(tmp_path, 0o777)  # the attacker could choose any path; this one it may write
    resolve_descriptor(QueueDescriptor.create_shm_queue(f"warm-{uuid.uuid4().hex[:8]}")).destroy()  # imports

    def plant() -> str:
        q = resolve_descriptor(desc)
        q.put_nowait(_MakesDirectory(marker))
        q.close()
        os.chmod(_segment.segment_path("shm", name), 0o666)
        return "planted"

    assert _as_nobody(plant) == "planted"
    st = os.stat(_segment.segment_path("shm", name))
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o666)
    for attach in (desc, _attach_only(desc)):
        with pytest.raises(QueuePermissionError, match="owned by uid 65534"):
            resolve_descriptor(attach).get(timeout=1)
    assert not os.path.exists(marker)
    assert pickle.loads(pickle.dumps(_MakesDirectory(marker))) is None and os.path.isdir(marker)  # the bait works


@needs_root
@pytest.mark.spec("SEG1", "E14")
@pytest.mark.parametrize("kind", ["shm", "sage"])
def test_a_segment_owned_by_another_uid_is_refused_even_with_mode_0600(names: list[tuple[str, str]], kind: str) -> None:
    name, desc = _new(names, kind)
    resolve_descriptor(desc).close()
    fd = os.open(_segment.segment_path(kind, name), os.O_RDONLY)
    try:
        os.fchown(fd, NOBODY, NOBODY)
    finally:
        os.close(fd)
    for attach in (desc, _attach_only(desc)):
        with pytest.raises(QueuePermissionError, match="owned by uid 65534"):
            resolve_descriptor(attach)


@pytest.mark.spec("SEG1", "E14")
@pytest.mark.parametrize("kind", ["shm", "sage"])
@pytest.mark.parametrize("mode", [0o666, 0o640, 0o602, 0o610])
def test_a_segment_others_may_write_or_read_is_refused(names: list[tuple[str, str]], kind: str, mode: int) -> None:
    name, desc = _new(names, kind)
    q = resolve_descriptor(desc)
    q.put("kept")
    os.chmod(_segment.segment_path(kind, name), mode)
    with pytest.raises(QueuePermissionError, match=f"mode {mode:04o}"):
        resolve_descriptor(desc)
    os.chmod(_segment.segment_path(kind, name), 0o600)
    again = resolve_descriptor(desc)  # the owner can repair it, and nothing was lost
    assert again.get(timeout=5) == "kept"
    again.close()
    q.close()


@pytest.mark.spec("SEG1", "E14")
def test_a_created_segment_is_0600_and_owned_by_us(names: list[tuple[str, str]]) -> None:
    name, desc = _new(names)
    resolve_descriptor(desc).close()
    st = os.stat(_segment.segment_path("shm", name))
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o600)


@pytest.mark.spec("SEG3", "E14")
@pytest.mark.parametrize("kind", ["shm", "sage"])
def test_a_symlink_in_dev_shm_is_never_followed(names: list[tuple[str, str]], kind: str) -> None:
    # A link named like our queue, pointing at a segment that would pass every other check.
    target_name, target_desc = _new(names, kind)
    resolve_descriptor(target_desc).close()
    name, desc = _new(names, kind)
    os.symlink(_segment.segment_path(kind, target_name), _segment.segment_path(kind, name))
    for attach in (desc, _attach_only(desc)):
        with pytest.raises(QueuePermissionError, match="symbolic link"):
            resolve_descriptor(attach)
    assert os.path.islink(_segment.segment_path(kind, name))  # left alone


@pytest.mark.spec("SEG1", "E14")
@pytest.mark.parametrize("kind", ["shm", "sage"])
def test_a_directory_or_fifo_under_the_name_is_refused(names: list[tuple[str, str]], kind: str) -> None:
    for make in (os.mkdir, os.mkfifo):
        name, desc = _new(names, kind)
        path = _segment.segment_path(kind, name)
        make(path, 0o600)
        try:
            for attach in (desc, _attach_only(desc)):
                with pytest.raises(QueuePermissionError, match=r"directory|not a regular file"):
                    resolve_descriptor(attach)
        finally:
            os.rmdir(path) if os.path.isdir(path) else os.unlink(path)


@needs_root
@pytest.mark.spec("SEG2", "E14")
def test_another_users_segment_we_cannot_open_gives_queue_permission_error(names: list[tuple[str, str]]) -> None:
    # The victim is now `nobody`; root's 0600 segment cannot even be opened by it.
    _name, desc = _new(names)
    resolve_descriptor(desc).close()
    resolve_descriptor(QueueDescriptor.create_shm_queue(f"warm-{uuid.uuid4().hex[:8]}")).destroy()  # imports

    def attach(d: QueueDescriptor) -> Callable[[], str]:
        def work() -> str:
            try:
                resolve_descriptor(d)
            except QueuePermissionError as exc:
                return f"QueuePermissionError isinstance(PermissionError)={isinstance(exc, PermissionError)}"
            except BaseException as exc:
                return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
            return "attached"

        return work

    for d in (desc, _attach_only(desc)):
        assert _as_nobody(attach(d)) == "QueuePermissionError isinstance(PermissionError)=True"


@pytest.mark.spec("SEG1", "SEG6")
def test_ls_describes_a_refused_segment_without_crashing(names: list[tuple[str, str]]) -> None:
    from sage_queue import tools

    name, desc = _new(names)
    resolve_descriptor(desc).close()
    os.chmod(_segment.segment_path("shm", name), 0o666)
    info = tools.describe("shm", name)
    assert info.note.startswith("cannot describe") and "0666" in info.note
    assert all(i.name != name for i in tools.collect_orphans("shm", min_age=0, dry_run=True))  # gc keeps it
    assert shm.remove_segment(name)


@pytest.mark.spec("SEG5")
@pytest.mark.parametrize("bad", ["", "a/b", "../x", "x" * 201, "sp ace", "nul\0"])
def test_segment_names_cannot_leave_the_library_namespace(bad: str) -> None:
    from sage_queue import InvalidMetadata

    with pytest.raises(InvalidMetadata, match="must match"):
        _segment.Segment.open("shm", bad, 4096, create=True)
    assert _segment.segment_path("shm", "ok.name-1") == "/dev/shm/sageq-shm-ok.name-1"
