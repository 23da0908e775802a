"""Items the kit sends through a queue, and the fidelity check (spec Q4).

Everything here is importable by name, so children (spawn, subprocess) can
rebuild the same items and the user class unpickles anywhere.
"""

from __future__ import annotations

import datetime
import decimal
import fractions
from collections import OrderedDict
from typing import Any

__all__ = [
    "UserRecord",
    "Undecodable",
    "UndecodableItemError",
    "sample_items",
    "large_items",
    "same_item",
    "describe_difference",
]

LARGE_SIZE = 200 * 1024
"""Large items: well above 64 KiB (a common pipe/ring chunk) but within any sane capacity."""


class UserRecord:
    """An object of a user class: equal by value, picklable by reference to this module."""

    def __init__(self, name: str, values: list[Any]) -> None:
        self.name = name
        self.values = values

    def __eq__(self, other: object) -> bool:
        return type(other) is UserRecord and (self.name, self.values) == (other.name, other.values)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"UserRecord({self.name!r}, {self.values!r})"


class UndecodableItemError(Exception):
    """Raised by unpickling an :class:`Undecodable`: the error a consumer must see (Q5 with Q18)."""


def _refuse_to_load(tag: str) -> Any:
    raise UndecodableItemError(f"kit item {tag!r} refuses to be unpickled (a deliberately undecodable item)")


class Undecodable:
    """Pickles fine, but unpickling it raises :class:`UndecodableItemError`: ``__reduce__`` names a
    loader that raises. A backend that serialises accepts it on ``put``; its consumer meets the error."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_refuse_to_load, (self.tag,))

    def __repr__(self) -> str:
        return f"Undecodable({self.tag!r})"


def sample_items() -> list[Any]:
    """Small items covering the types users put: scalars that compare equal across types
    (``True == 1 == 1.0``), empty and nested containers, tuples inside lists, user objects."""
    return [
        None,
        0,
        1,
        True,
        False,
        -(2**70),
        1.0,
        -0.0,
        complex(1, -2),
        "",
        "text",
        "ünïcödé ✓ \x00 nul",
        b"",
        b"\x00\xffbytes",
        bytearray(b"mutable"),
        (),
        (1,),
        [],
        {},
        set(),
        frozenset({1, 2}),
        (1, (2, (3, None))),
        [(1, 2), [3, (4,)]],
        {"a": (1, 2), 3: [True, None], (4, 5): {"x": b"y"}},
        OrderedDict([("z", 1), ("a", 2)]),
        decimal.Decimal("1.10"),
        fractions.Fraction(3, 7),
        datetime.datetime(2026, 11, 27, 12, 0, 0),
        UserRecord("rec", [1, (2, 3), None]),
    ]


def large_items() -> list[Any]:
    """Items above 64 KiB: bytes, str, and a nested structure holding large parts."""
    return [
        bytes(range(256)) * (LARGE_SIZE // 256),
        "L" * LARGE_SIZE + "✓",
        [b"\x01" * (LARGE_SIZE // 2), ("x" * (LARGE_SIZE // 2), None)],
    ]


def describe_difference(put: Any, got: Any, path: str = "item") -> str | None:
    """None when ``got`` equals ``put`` with the same type at every level; else where they differ."""
    if type(put) is not type(got):
        return f"{path}: put a {type(put).__name__}, got a {type(got).__name__} ({_short(got)})"
    if isinstance(put, (list, tuple)):
        if len(put) != len(got):
            return f"{path}: length {len(put)} became {len(got)}"
        for i, (a, b) in enumerate(zip(put, got, strict=False)):
            problem = describe_difference(a, b, f"{path}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(put, dict):
        if list(put) != list(got):
            # Key types matter too (1 vs "1"), and dict order is part of a dict's value in Python.
            return f"{path}: keys {list(put)!r} became {list(got)!r}"
        for key in put:
            problem = describe_difference(put[key], got[key], f"{path}[{key!r}]")
            if problem:
                return problem
        return None
    if isinstance(put, (set, frozenset)):
        if put != got or {type(x) for x in put} != {type(x) for x in got}:
            return f"{path}: {_short(put)} became {_short(got)}"
        return None
    if isinstance(put, float) and put == 0.0:
        if str(put) != str(got):  # -0.0 == 0.0, but the sign is part of the value
            return f"{path}: {put!r} became {got!r}"
        return None
    if put != got:
        return f"{path}: {_short(put)} became {_short(got)}"
    return None


def same_item(put: Any, got: Any) -> bool:
    return describe_difference(put, got) is None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} chars)"
