"""The durable store of an rpc server (``--data-dir``): SQLite in WAL mode (spec RPC14).

One database file ``queues.sqlite3`` in the data directory. Every state change the server
acknowledges is committed here *before* the reply leaves: the queue mutation and the client's
dedupe record (last seq + the reply itself) in ONE transaction, so a server killed at any
instruction and restarted on the same directory has either done the whole request (and answers a
retransmission with the stored reply) or none of it. ``synchronous=NORMAL`` in WAL mode: a commit
survives the death of the process (SIGKILL), not necessarily a power cut.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from typing import Any, Optional

__all__ = ["Store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY, uid BLOB NOT NULL, maxsize INTEGER NOT NULL,
    puts INTEGER NOT NULL DEFAULT 0, gets INTEGER NOT NULL DEFAULT 0,
    bytes_in INTEGER NOT NULL DEFAULT 0, bytes_out INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS items (name TEXT NOT NULL, pos INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (name, pos)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS clients (client_id BLOB PRIMARY KEY, seq INTEGER NOT NULL, reply BLOB,
    held TEXT, held_items BLOB);
"""


class Store:
    """Thin wrapper; every method is called from the server loop's thread only."""

    def __init__(self, data_dir: str) -> None:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(data_dir, "queues.sqlite3")
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        self.db.close()

    def instance(self, fresh: bytes) -> bytes:
        """The server instance id kept in this directory (``fresh`` the first time)."""
        row = self.db.execute("SELECT v FROM meta WHERE k='instance'").fetchone()
        if row is not None:
            return bytes(row[0])
        self.db.execute("INSERT INTO meta VALUES ('instance', ?)", (fresh,))
        return fresh

    def load_queues(self) -> list[tuple[str, bytes, int, int, int, int, int, list[tuple[int, bytes]]]]:
        out = []
        for name, uid, maxsize, puts, gets, b_in, b_out in self.db.execute(
            "SELECT name, uid, maxsize, puts, gets, bytes_in, bytes_out FROM queues"
        ).fetchall():
            items = [
                (int(p), bytes(d))
                for p, d in self.db.execute("SELECT pos, data FROM items WHERE name=? ORDER BY pos", (name,))
            ]
            out.append((name, bytes(uid), maxsize, puts, gets, b_in, b_out, items))
        return out

    def load_clients(self) -> list[tuple[bytes, int, Optional[bytes], Optional[str], Optional[bytes]]]:
        return [
            (bytes(c), s, None if r is None else bytes(r), h, None if hi is None else bytes(hi))
            for c, s, r, h, hi in self.db.execute("SELECT client_id, seq, reply, held, held_items FROM clients")
        ]

    # Each of the following is one transaction.

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def create_queue(self, name: str, uid: bytes, maxsize: int) -> None:
        self.db.execute("INSERT INTO queues (name, uid, maxsize) VALUES (?, ?, ?)", (name, uid, maxsize))

    def drop_queue(self, name: str) -> None:
        self.db.execute("DELETE FROM queues WHERE name=?", (name,))
        self.db.execute("DELETE FROM items WHERE name=?", (name,))

    def add_items(self, name: str, items: Iterable[tuple[int, bytes]]) -> None:
        self.db.executemany("INSERT INTO items (name, pos, data) VALUES (?, ?, ?)", [(name, p, d) for p, d in items])

    def remove_items(self, name: str, positions: list[int]) -> None:
        self.db.executemany("DELETE FROM items WHERE name=? AND pos=?", [(name, p) for p in positions])

    def counters(self, name: str, puts: int, gets: int, b_in: int, b_out: int) -> None:
        self.db.execute(
            "UPDATE queues SET puts=?, gets=?, bytes_in=?, bytes_out=? WHERE name=?", (puts, gets, b_in, b_out, name)
        )

    def client(
        self, client_id: bytes, seq: int, reply: Optional[bytes], held: Optional[str], held_items: Optional[bytes]
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?, ?)", (client_id, seq, reply, held, held_items)
        )

    def forget_clients(self, client_ids: list[bytes]) -> None:
        self.db.executemany("DELETE FROM clients WHERE client_id=?", [(c,) for c in client_ids])

    def raw(self) -> Any:
        return self.db
