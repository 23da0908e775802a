"""The operation history of a harness run: what every worker invoked, and how each call ended.

Each worker (a process, or a thread with ``--threads``) appends to a log file of its own,
one record per event, each record written by ONE ``os.write`` of a few dozen bytes with
``O_APPEND``: a SIGKILL lands before or after it, so a log never holds half a record (the
reader still drops a torn tail rather than misparse it). A worker is sequential, so its
log is ``invoke, completion, invoke, completion, ...``; an ``invoke`` with no completion
after it is a call in flight when the worker was killed (Jepsen's ``info``: it may or may
not have taken effect).

Record: the :data:`HEADER` then ``n`` :data:`TAG` s.

* ``invoke put``: the items about to be put (their tags);
* ``ok put``: no tags (the invoke's items are now acknowledged);
* ``invoke get``: no tags; ``n`` field = the number of items asked for (1 for ``get``);
* ``ok get``: the items got, each with its checksum verdict;
* ``timeout``: ``Full``/``Empty`` after the call's timeout (a put that times out put
  nothing, Q-contract); ``fail``: any other exception (its type name goes to stderr).

An item's tag is ``(producer slot, producer incarnation, seq)``: unique per item, ordered
per producer incarnation.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Optional

__all__ = ["INVOKE", "OK", "FAIL", "TIMEOUT", "PUT", "GET", "Tag", "Op", "HistoryLog", "read_history", "process_name"]

INVOKE, OK, FAIL, TIMEOUT = 1, 2, 3, 4
KIND_NAMES = {INVOKE: "invoke", OK: "ok", FAIL: "fail", TIMEOUT: "timeout"}
PUT, GET = 1, 2
OP_NAMES = {PUT: "put", GET: "get"}

HEADER = struct.Struct("<BBHIdd")
"""kind, op, n (tags that follow, or items asked by an ``invoke get``), reserved, monotonic time, timeout (-1: none)."""
TAG = struct.Struct("<IIQB")
"""producer slot, producer incarnation, seq, checksum good (1) / corrupt (0)."""

Tag = tuple[int, int, int]
"""(producer slot, producer incarnation, seq): one item's identity."""


def process_name(role: str, slot: int, incarnation: int) -> str:
    """``p0.3`` = producer slot 0, incarnation 3; ``c1.0`` = consumer slot 1, first incarnation."""
    return f"{role[0]}{slot}.{incarnation}"


@dataclass(frozen=True)
class Op:
    """One event of the history."""

    process: str
    """Who: ``p0.3`` / ``c1.0`` (see :func:`process_name`)."""
    kind: int
    """INVOKE, OK, FAIL or TIMEOUT."""
    op: int
    """PUT or GET."""
    time: float
    """``time.monotonic()`` when the event happened (the same clock in every process of the machine)."""
    timeout: Optional[float]
    """The call's timeout (None: blocking without one)."""
    items: tuple[Tag, ...] = ()
    """Items put (invoke put) or got (ok get)."""
    corrupt: int = 0
    """Items of an ``ok get`` whose payload failed its checksum."""
    asked: int = 0
    """Items asked for by an ``invoke get`` (its loss bound if the caller dies inside)."""

    def __str__(self) -> str:
        what = f"{self.process} {KIND_NAMES[self.kind]} {OP_NAMES[self.op]} t={self.time:.6f}"
        return f"{what} items={list(self.items)[:4]}" if self.items else what


class HistoryLog:
    """The writer end of one worker's log (one ``os.write`` per event; see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _write(self, kind: int, op: int, n: int, timeout: Optional[float], tags: bytes = b"") -> None:
        os.write(self.fd, HEADER.pack(kind, op, n, 0, time.monotonic(), -1.0 if timeout is None else timeout) + tags)

    def invoke_put(self, tags: Iterable[Tag], timeout: Optional[float]) -> None:
        packed = [TAG.pack(*t, 1) for t in tags]
        self._write(INVOKE, PUT, len(packed), timeout, b"".join(packed))

    def invoke_get(self, asked: int, timeout: Optional[float]) -> None:
        self._write(INVOKE, GET, asked, timeout)

    def ok_get(self, got: Iterable[tuple[int, int, int, bool]], timeout: Optional[float]) -> None:
        packed = [TAG.pack(s, i, q, int(good)) for s, i, q, good in got]
        self._write(OK, GET, len(packed), timeout, b"".join(packed))

    def complete(self, kind: int, op: int, timeout: Optional[float]) -> None:
        """``ok put``, or a ``timeout``/``fail`` of either op."""
        self._write(kind, op, 0, timeout)

    def close(self) -> None:
        os.close(self.fd)


def _records(data: bytes) -> Iterator[tuple[tuple[int, int, int, int, float, float], list[tuple[int, ...]]]]:
    pos = 0
    while pos + HEADER.size <= len(data):
        header = HEADER.unpack_from(data, pos)
        kind, op, n = header[0], header[1], header[2]
        tags = n if (kind, op) in ((INVOKE, PUT), (OK, GET)) else 0
        end = pos + HEADER.size + tags * TAG.size
        if end > len(data):
            return  # a torn tail (cannot happen with one small write per record): never misparse it
        yield header, [TAG.unpack_from(data, pos + HEADER.size + i * TAG.size) for i in range(tags)]
        pos = end


def read_history(path: str, process: str) -> list[Op]:
    """The events of one worker's log, in its order. A missing log (a worker killed before opening it) is empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    ops = []
    for (kind, op, n, _, t, timeout), tags in _records(data):
        items = tuple((s, i, q) for s, i, q, _good in tags)
        ops.append(
            Op(
                process,
                kind,
                op,
                t,
                None if timeout < 0 else timeout,
                items,
                corrupt=sum(1 for *_, good in tags if not good),
                asked=n if (kind, op) == (INVOKE, GET) else 0,
            )
        )
    return ops
