"""The rpc backend on real sockets and real processes (spec/backends/rpc.md)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from sage_queue import (
    IncompatibleQueue,
    QueueClosed,
    QueueConnectionError,
    QueueDescriptor,
    QueueDestroyed,
    QueueNotFound,
    QueuePermissionError,
    resolve_descriptor,
)
from sage_queue.backends.rpc.client import RPCQueueStub
from sage_queue.backends.rpc.server import RPCQueueServer, ServerProcess
from sage_queue.backends.rpc.wire import (
    REPLY_MAGIC,
    REQUEST_MAGIC,
    BadFrame,
    Sealer,
    generate_key_file,
    load_key,
    seal,
    unseal,
)

RpcFactory = Any  # the `rpc` fixture of conftest.py (a factory of fresh queues)

# -- a raw client: crafted frames on a real DEALER socket ------------------------------------------


class RawClient:
    """Speaks the wire protocol by hand, to send what a well-behaved client never would."""

    def __init__(self, address: tuple[str, int], key: bytes) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{address[0]}:{address[1]}")
        self.key = key
        self.client_id = os.urandom(16)
        self.instance = bytes(16)

    def frame(self, seq: int, body: list[Any], ts: float | None = None, key: bytes | None = None) -> bytes:
        return seal(
            key or self.key, REQUEST_MAGIC, self.client_id, seq, time.time() if ts is None else ts, self.instance, body
        )

    def send_raw(self, *parts: bytes) -> None:
        self.sock.send_multipart(list(parts))

    def recv(self, timeout: float = 5.0) -> list[Any] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        header, body = unseal(self.key, self.sock.recv(), REPLY_MAGIC, 1 << 40)
        assert header.client_id == self.client_id
        return body

    def call(self, seq: int, body: list[Any], timeout: float = 5.0) -> list[Any] | None:
        self.send_raw(self.frame(seq, body))
        return self.recv(timeout)

    def hello(self) -> None:
        reply = self.call(0, ["hello"])
        assert reply is not None and reply[0] == "ok"
        self.instance = reply[1]

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def status(handle: Any) -> dict[str, Any]:
    result: dict[str, Any] = handle.server_status()
    return result


# -- server: ways to run it --------------------------------------------------------------------


@pytest.mark.spec("RPC1", "RPC4")
@pytest.mark.timeout(60)
def test_serve_cli_port_zero_generated_key_and_clean_sigterm(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "k"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage_queue.cli", "serve", "--port", "0", "--key-file", str(key_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == f"generated key file {key_file}"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on tcp://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert port > 0
        with resolve_descriptor(
            QueueDescriptor.create("rpc", "cli", host="127.0.0.1", port=port, key_file=str(key_file))
        ) as q:
            q.put({"x": 1})
            assert q.get(timeout=5) == {"x": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    # The port is free again: a new server binds it.
    again = RPCQueueServer(port=port, key_file=str(key_file))
    again.stop()
    again.serve_forever()  # returns at once (stopped), releasing the socket


@pytest.mark.spec("RPC1")
@pytest.mark.timeout(60)
def test_serve_sigint_exits_zero(rpc_key_file: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage_queue.backends.rpc.server", "--port", "0", "--key-file", rpc_key_file],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening on tcp://127.0.0.1:")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.spec("RPC1", "RPC15")
@pytest.mark.timeout(60)
def test_server_in_a_thread_many_queues_not_found_and_incompatible(rpc_key_file: str) -> None:
    with RPCQueueServer(key_file=rpc_key_file) as server:
        host, port = server.address
        assert host == "127.0.0.1"

        def desc(name: str, maxsize: int = 0, **kw: Any) -> QueueDescriptor:
            return QueueDescriptor.create("rpc", name, maxsize, host=host, port=port, key_file=rpc_key_file, **kw)

        a, b = resolve_descriptor(desc("a")), resolve_descriptor(desc("b", 3))
        a.put(1)
        b.put_many([2, 3])
        assert (a.qsize(), b.qsize()) == (1, 2)
        with pytest.raises(QueueNotFound):
            resolve_descriptor(desc("nope", create=False))
        with pytest.raises(IncompatibleQueue, match="maxsize 3"):
            resolve_descriptor(desc("b", 5))
        with pytest.raises(IncompatibleQueue, match="durable"):
            resolve_descriptor(desc("a", durable=True))
        st = server.status()
        assert (st["queues"], st["items"], st["durable"]) == (2, 3, False)
        assert status(a)["queues"] == 2
        s = b.stats()
        assert (s.scope, s.puts, s.gets, s.depth) == ("queue", 2, 0, 2)
        assert s.bytes_in == len(pickle.dumps(2, protocol=5)) + len(pickle.dumps(3, protocol=5))
        a.destroy()
        b.destroy()


# -- long poll -----------------------------------------------------------------------------------


@pytest.mark.spec("RPC2")
@pytest.mark.timeout(60)
def test_blocked_get_waits_in_the_server_and_never_delays_another_clients_put(rpc: RpcFactory) -> None:
    q = rpc()
    other = resolve_descriptor(q.descriptor)
    requests_before = status(q)["requests"]
    got: list[Any] = []
    blocked = [threading.Thread(target=lambda: got.append(q.get(timeout=30))) for _ in range(4)]
    for t in blocked:
        t.start()
    time.sleep(1.0)
    # Long poll, not client polling: in 1 s, 4 blocked gets cost a handful of requests (their first
    # send plus heartbeat retransmissions every 2 s), not one per poll interval.
    assert status(q)["requests"] - requests_before <= 4 * 2 + 1
    t0 = time.monotonic()
    other.put_many([1, 2, 3, 4])  # answered while four gets are parked on the same queue
    assert time.monotonic() - t0 < 5.0
    for t in blocked:
        t.join(10)
    assert sorted(got) == [1, 2, 3, 4]
    other.close()


@pytest.mark.spec("RPC2")
@pytest.mark.timeout(60)
def test_timeouts_are_never_early(rpc: RpcFactory) -> None:
    q = rpc(1)
    for timeout in (0.05, 0.3):
        t0 = time.monotonic()
        with pytest.raises(queue.Empty):
            q.get(timeout=timeout)
        assert time.monotonic() - t0 >= timeout
    q.put(0)
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(1, timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    assert q.get_many(5) == [0]


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.spec("RPC3", "RPC5", "RPC6")
@pytest.mark.timeout(90)
def test_bad_frames_are_dropped_counted_and_the_server_keeps_serving(tmp_path: Path, rpc_key_file: str) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    bomb = pickle.dumps(Exploit())
    key = load_key(rpc_key_file)
    with RPCQueueServer.spawn(key_file=rpc_key_file, max_frame=1 << 20) as server:
        q = resolve_descriptor(
            QueueDescriptor.create(
                "rpc", "victim", host=server.address[0], port=server.address[1], key_file=rpc_key_file
            )
        )
        raw = RawClient(server.address, key)
        raw.hello()
        before = status(q)
        raw.send_raw(b"garbage")  # too short for a header
        raw.send_raw(os.urandom(500))  # a random MAC
        raw.send_raw(bomb)  # a pickle that runs code if loaded
        raw.send_raw(raw.frame(1, ["put", "victim", b"", [bomb], None], key=os.urandom(32)))  # wrong key
        good = raw.frame(1, ["status"])
        raw.send_raw(good[: len(good) - 3])  # truncated
        raw.send_raw(good[:40] + bytes([good[40] ^ 1]) + good[41:])  # tampered
        raw.send_raw(good, b"second part")  # two frames
        raw.send_raw(raw.frame(1, ["status"], ts=time.time() - 3600))  # an hour old
        raw.send_raw(raw.frame(1, ["status", b"x" * (1 << 20)]))  # above max_frame
        raw.send_raw(b"\0" * (3 << 20))  # above 2 x max_frame: libzmq drops the connection
        time.sleep(0.5)
        after = status(q)
        assert len(bomb) > 100  # long enough to be checked as a MAC + header, not dismissed as short
        # random MAC, bomb, wrong key, truncated (its MAC no longer matches), tampered
        assert after["rejected_auth"] - before["rejected_auth"] == 5
        assert after["rejected_malformed"] - before["rejected_malformed"] == 2  # too short, two frames
        assert after["rejected_stale"] - before["rejected_stale"] == 1
        assert after["rejected_oversized"] - before["rejected_oversized"] == 1
        assert after["requests"] - before["requests"] == 1  # only status() itself
        # An authenticated frame whose body is not msgpack is malformed, never unpickled.
        raw2 = RawClient(server.address, key)
        raw2.hello()
        before = status(q)
        import hashlib
        import struct

        payload = struct.pack("!4sB16sQd16s", REQUEST_MAGIC, 1, raw2.client_id, 1, time.time(), raw2.instance) + bomb
        raw2.send_raw(hashlib.blake2b(payload, key=key, digest_size=32, person=b"sage-queue rpc").digest() + payload)
        # And an authenticated put of the bomb as an item: stored as bytes, never loaded by the server.
        assert raw2.call(2, ["open", "victim", 0, True])[0] == "ok"  # type: ignore[index]
        time.sleep(0.3)
        assert status(q)["rejected_malformed"] - before["rejected_malformed"] == 1
        assert not marker.exists(), "a frame was unpickled"
        # The server still serves everyone.
        q.put("still here")
        assert q.get(timeout=5) == "still here"
        assert server.proc.poll() is None
        raw.close()
        raw2.close()
        q.destroy()


@pytest.mark.spec("RPC6", "RPC10")
@pytest.mark.timeout(60)
def test_retransmission_executes_once_and_replays_are_dropped(rpc_server: ServerProcess, rpc_key_file: str) -> None:
    key = load_key(rpc_key_file)
    raw = RawClient(rpc_server.address, key)
    raw.hello()
    opened = raw.call(1, ["open", "dedupe", 0, True])
    assert opened is not None and opened[0] == "ok"
    uid = opened[1]
    put = raw.frame(2, ["put", "dedupe", uid, [b"one"], None])
    raw.send_raw(put)
    assert raw.recv() == ["ok"]
    raw.send_raw(put)  # the same frame again: a retransmission (reply lost), answered from the record
    assert raw.recv() == ["ok"]
    assert raw.call(3, ["qsize", "dedupe", uid]) == ["ok", 1], "a retransmitted put was enqueued twice"
    get = raw.frame(4, ["get", "dedupe", uid, 1, 0.0])
    raw.send_raw(get)
    assert raw.recv() == ["ok", [b"one"]]
    raw.send_raw(raw.frame(4, ["get", "dedupe", uid, 1, 0.0]))  # retransmitted get: the same item again
    assert raw.recv() == ["ok", [b"one"]]
    assert raw.call(5, ["qsize", "dedupe", uid]) == ["ok", 0]
    # A replay of an older request (seq 2 < 5): dropped without an answer, counted.
    with resolve_descriptor(
        QueueDescriptor.create(
            "rpc", "dedupe", host=rpc_server.address[0], port=rpc_server.address[1], key_file=rpc_key_file
        )
    ) as q:
        before = status(q)["rejected_replay"]
        raw.send_raw(put)
        assert raw.recv(timeout=0.5) is None
        assert status(q)["rejected_replay"] == before + 1
        assert q.qsize() == 0
        # A request naming another server instance is answered "stale", never executed.
        raw.instance = os.urandom(16)
        assert raw.call(6, ["put", "dedupe", uid, [b"two"], None]) == ["stale"]
        assert q.qsize() == 0
        q.destroy()
    raw.close()


@pytest.mark.spec("RPC4", "RPC5")
@pytest.mark.timeout(60)
def test_keys_wrong_key_and_key_file_permissions(tmp_path: Path, rpc_server: ServerProcess) -> None:
    host, port = rpc_server.address
    wrong, _ = generate_key_file(str(tmp_path / "wrong.key"))
    with pytest.raises(QueueNotFound, match="does not share our key"):
        resolve_descriptor(
            QueueDescriptor.create("rpc", "k", host=host, port=port, key_file=str(wrong), connect_timeout=1.0)
        )
    loose = tmp_path / "loose.key"
    loose.write_text(os.urandom(32).hex())
    loose.chmod(0o644)
    with pytest.raises(QueuePermissionError, match="group and others"):
        resolve_descriptor(QueueDescriptor.create("rpc", "k", host=host, port=port, key_file=str(loose)))
    with pytest.raises(QueuePermissionError, match="cannot read"):
        resolve_descriptor(QueueDescriptor.create("rpc", "k", host=host, port=port, key_file=str(tmp_path / "absent")))
    with pytest.raises(QueuePermissionError, match="unset"):
        resolve_descriptor(QueueDescriptor.create("rpc", "k", host=host, port=port, key_env="SAGEQ_NO_SUCH_VAR"))
    short = tmp_path / "short.key"  # 31 bytes: below the 32 the MAC's strength needs
    short.write_text(os.urandom(31).hex())
    short.chmod(0o600)
    with pytest.raises(QueuePermissionError, match="at least 32"):
        resolve_descriptor(QueueDescriptor.create("rpc", "k", host=host, port=port, key_file=str(short)))


@pytest.mark.spec("RPC4")
@pytest.mark.timeout(60)
def test_key_env_and_the_key_never_in_the_descriptor(
    rpc_server: ServerProcess, rpc_key_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_hex = Path(rpc_key_file).read_text().strip()
    monkeypatch.setenv("SAGEQ_TEST_RPC_KEY", key_hex)
    d = QueueDescriptor.create(
        "rpc", "envkey", host=rpc_server.address[0], port=rpc_server.address[1], key_env="SAGEQ_TEST_RPC_KEY"
    )
    assert key_hex not in d.to_json()
    with resolve_descriptor(d) as q:
        q.put(b"k")
        assert q.get(timeout=5) == b"k"
        assert key_hex.encode() not in pickle.dumps(q)
        q.destroy()


@pytest.mark.spec("RPC7")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["json", "msgpack"])
def test_serializers_without_pickle(rpc: RpcFactory, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    q = rpc(serializer=name)

    def no_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle.loads called")

    monkeypatch.setattr(pickle, "loads", no_unpickling)  # a tripwire only: the queue itself is real
    q.put({"a": [1, 2.5, None, "s"]})
    q.put_many([[1, 2], "x"])
    assert q.get(timeout=5) == {"a": [1, 2.5, None, "s"]}
    assert q.get_many(5, timeout=5) == [[1, 2], "x"]
    with pytest.raises(TypeError):
        q.put(object())
    assert q.qsize() == 0


# -- client ----------------------------------------------------------------------------------------


@pytest.mark.spec("RPC8")
@pytest.mark.timeout(120)
def test_64_threads_on_one_handle(rpc: RpcFactory) -> None:
    q = rpc(8)
    producers, per = 40, 50
    got: list[tuple[int, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def produce(p: int) -> None:
        try:
            for i in range(per):
                q.put((p, i), timeout=60)
        except BaseException as exc:
            errors.append(exc)

    def consume() -> None:
        try:
            while True:
                item = q.get(timeout=60)
                if item is None:
                    return
                with lock:
                    got.append(item)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    threads += [threading.Thread(target=consume) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads[:producers]:
        t.join(100)
    for _ in range(32):
        q.put(None, timeout=60)
    for t in threads[producers:]:
        t.join(100)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads)
    assert sorted(got) == sorted((p, i) for p in range(producers) for i in range(per))
    assert len(q._idle) <= 72  # the pool never holds more channels than calls that ran at once


@pytest.mark.spec("RPC12")
@pytest.mark.timeout(60)
def test_signal_handler_close_releases_a_blocked_get_and_nothing_is_lost(rpc: RpcFactory) -> None:
    q = rpc()
    other = resolve_descriptor(q.descriptor)

    def handler(signum: int, frame: Any) -> None:
        q.close()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        t0 = time.monotonic()
        with pytest.raises(QueueClosed) as info:
            q.get()
        assert not isinstance(info.value, QueueDestroyed)
        assert time.monotonic() - t0 < 5.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    # The cancelled get was unparked: an item put now goes to the live handle, not to the closed one.
    other.put("after")
    assert other.get(timeout=5) == "after"
    other.close()


@pytest.mark.spec("RPC12")
@pytest.mark.timeout(60)
def test_cancel_returns_an_answered_get_to_the_head(rpc_server: ServerProcess, rpc_key_file: str) -> None:
    raw = RawClient(rpc_server.address, load_key(rpc_key_file))
    raw.hello()
    uid = raw.call(1, ["open", "cancelq", 0, True])[1]  # type: ignore[index]
    assert raw.call(2, ["put", "cancelq", uid, [b"a", b"b", b"c"], None]) == ["ok"]
    assert raw.call(3, ["get", "cancelq", uid, 2, 0.0]) == ["ok", [b"a", b"b"]]
    # The client never "took" that answer (its handle was closed): cancel puts the items back, in order.
    assert raw.call(3, ["cancel"]) == ["ok"]
    assert raw.call(4, ["get", "cancelq", uid, 5, 0.0]) == ["ok", [b"a", b"b", b"c"]]
    assert raw.call(5, ["destroy", "cancelq", uid]) == ["ok"]
    raw.close()


@pytest.mark.spec("RPC9", "RPC12")
@pytest.mark.timeout(60)
def test_a_cancel_that_overtakes_its_request_keeps_it_from_ever_executing(
    rpc_server: ServerProcess, rpc_key_file: str
) -> None:
    # The cancel comes first (sent on a new connection, while a partition held the request): the request
    # that arrives after it is answered "cancelled" and takes nothing; the channel carries on at seq + 1.
    raw = RawClient(rpc_server.address, load_key(rpc_key_file))
    raw.hello()
    name = f"tomb_{os.getpid()}"
    uid = raw.call(1, ["open", name, 0, True])[1]  # type: ignore[index]
    assert raw.call(2, ["put", name, uid, [b"a", b"b"], None]) == ["ok"]
    assert raw.call(3, ["cancel"]) == ["ok"]
    assert raw.call(3, ["get", name, uid, 5, 0.0]) == ["cancelled"]
    assert raw.call(4, ["get", name, uid, 5, 0.0]) == ["ok", [b"a", b"b"]]
    assert raw.call(5, ["destroy", name, uid]) == ["ok"]
    raw.close()


@pytest.mark.spec("RPC9")
@pytest.mark.timeout(60)
def test_a_request_that_arrives_after_its_call_gave_up_is_never_executed(
    rpc_server: ServerProcess, rpc_key_file: str
) -> None:
    # A timed put/get carries the time after which its client takes no answer: later, it is answered
    # "late" and changes nothing (a get takes no item, a put enqueues none); in time, it executes.
    raw = RawClient(rpc_server.address, load_key(rpc_key_file))
    raw.hello()
    name = f"late_{os.getpid()}"
    uid = raw.call(1, ["open", name, 0, True])[1]  # type: ignore[index]
    assert raw.call(2, ["put", name, uid, [b"a"], 1.0, time.time() + 30]) == ["ok"]
    assert raw.call(3, ["get", name, uid, 1, 1.0, time.time() - 1]) == ["late"]
    assert raw.call(3, ["get", name, uid, 1, 1.0, time.time() - 1]) == ["late"]  # from the record
    assert raw.call(4, ["put", name, uid, [b"b"], 1.0, time.time() - 1]) == ["late"]
    assert raw.call(5, ["qsize", name, uid]) == ["ok", 1]
    assert raw.call(6, ["get", name, uid, 1, 5.0, time.time() + 30]) == ["ok", [b"a"]]
    # A parked get is answered "empty" when its client gives up, even before its own timeout.
    start = time.monotonic()
    assert raw.call(7, ["get", name, uid, 1, 30.0, time.time() + 0.5]) == ["empty"]
    assert time.monotonic() - start < 10
    assert raw.call(8, ["destroy", name, uid]) == ["ok"]
    raw.close()


@pytest.mark.spec("RPC13")
@pytest.mark.timeout(60)
def test_destroy_reaches_blocked_and_idle_handles(rpc: RpcFactory) -> None:
    q = rpc()
    idle = resolve_descriptor(q.descriptor)
    blocked = resolve_descriptor(q.descriptor)
    caught: list[BaseException] = []

    def wait() -> None:
        try:
            blocked.get(timeout=30)
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    q.put("x")
    time.sleep(0.3)  # the blocked get took "x"
    t.join(5)
    assert not caught
    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    q.destroy()
    t.join(5)
    assert not t.is_alive() and len(caught) == 1 and isinstance(caught[0], QueueDestroyed)
    with pytest.raises(QueueDestroyed):
        idle.put(1)
    assert idle.closed
    with pytest.raises(QueueDestroyed):
        idle.get_nowait()
    # Resolving again creates a new, empty queue; the old handles never reach it.
    fresh = resolve_descriptor(q.descriptor)
    assert fresh.qsize() == 0
    fresh.destroy()


@pytest.mark.spec("RPC16")
@pytest.mark.timeout(60)
def test_get_many_puts_the_undecodable_item_and_later_ones_back(rpc: RpcFactory) -> None:
    from conformance.samples import Undecodable, UndecodableItemError

    q = rpc()
    q.put_many([1, Undecodable("a"), 2, 3])
    assert q.get_many(10, timeout=5) == [1]
    assert q.qsize() == 3  # the bad item and the later ones went back
    with pytest.raises(UndecodableItemError):
        q.get_many(10, timeout=5)
    assert q.get_many(10, timeout=5) == [2, 3]
    q.put_many([Undecodable("b"), 4])
    with pytest.raises(UndecodableItemError):
        q.get_many(10, timeout=5)
    assert q.get_many(10, timeout=5) == [4]
    assert q.qsize() == 0


@pytest.mark.spec("RPC8")
@pytest.mark.timeout(60)
def test_subprocess_child_with_only_the_descriptor_json(rpc: RpcFactory) -> None:
    q = rpc()
    q.put_many([{"n": i} for i in range(5)])
    code = (
        "import sys, json\n"
        "from sage_queue import resolve_descriptor\n"
        "q = resolve_descriptor(sys.stdin.read())\n"
        "items = q.get_many(10, timeout=10)\n"
        "q.put(('back', [i['n'] for i in items]))\n"
        "q.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=q.descriptor.to_json(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert q.get(timeout=10) == ("back", [0, 1, 2, 3, 4])
    assert json.loads(q.descriptor.to_json())["queue_type"] == "rpc"


# -- restarts --------------------------------------------------------------------------------------


@pytest.mark.spec("RPC9", "RPC11")
@pytest.mark.timeout(120)
def test_reconnect_after_a_restart_of_a_memory_server(tmp_path: Path, rpc_key_file: str) -> None:
    server = RPCQueueServer.spawn(key_file=rpc_key_file)
    host, port = server.address
    try:
        q = resolve_descriptor(
            QueueDescriptor.create("rpc", "rs", host=host, port=port, key_file=rpc_key_file, retry_timeout=20.0)
        )
        q.put("lost with the instance")
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(q.get(timeout=60)))
        t.start()  # blocked across the restart
        time.sleep(0.5)
        server.kill()
        server = RPCQueueServer.spawn(port=port, key_file=rpc_key_file)
        second = resolve_descriptor(q.descriptor)
        time.sleep(3.0)  # the blocked get's channel greets the new instance and reparks its get
        second.put("new")
        t.join(30)
        assert got == ["lost with the instance"] or got == ["new"]
        q.put("again")  # the handle reopened its queue on the new instance
        assert second.get(timeout=10) in ("again", "new")
        q.close()
        second.close()
    finally:
        server.stop()


@pytest.mark.spec("RPC9", "E16")
@pytest.mark.timeout(60)
def test_a_dead_server_gives_queue_connection_error_in_bounded_time(rpc_key_file: str) -> None:
    server = RPCQueueServer.spawn(key_file=rpc_key_file)
    host, port = server.address
    q = resolve_descriptor(
        QueueDescriptor.create("rpc", "dead", host=host, port=port, key_file=rpc_key_file, retry_timeout=1.5)
    )
    server.kill()
    t0 = time.monotonic()
    with pytest.raises(QueueConnectionError):
        q.get()  # no timeout: bounded by retry_timeout of silence
    assert time.monotonic() - t0 < 10
    t0 = time.monotonic()
    with pytest.raises(QueueConnectionError):
        q.put(1, timeout=0.2)
    assert time.monotonic() - t0 < 10
    q.close()
    with pytest.raises(QueueNotFound):
        resolve_descriptor(
            QueueDescriptor.create("rpc", "dead", host=host, port=port, key_file=rpc_key_file, connect_timeout=0.5)
        )


@pytest.mark.spec("RPC14", "RPC10")
@pytest.mark.timeout(180)
def test_durable_server_survives_sigkill(tmp_path: Path, rpc_key_file: str) -> None:
    data = str(tmp_path / "data")
    server = RPCQueueServer.spawn(key_file=rpc_key_file, data_dir=data)
    host, port = server.address
    try:
        d = QueueDescriptor.create("rpc", "dur", host=host, port=port, key_file=rpc_key_file, durable=True)
        q = resolve_descriptor(d)
        acked_puts: list[int] = []
        acked_gets: list[int] = []
        stop = threading.Event()

        def producer() -> None:
            i = 0
            while not stop.is_set():
                try:
                    q.put(i, timeout=30)
                except Exception:
                    return
                acked_puts.append(i)
                i += 1

        def consumer() -> None:
            while not stop.is_set():
                try:
                    acked_gets.append(q.get(timeout=30))
                except Exception:
                    return

        threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
        for t in threads:
            t.start()
        for _ in range(3):
            time.sleep(1.0)
            os.kill(server.pid, signal.SIGKILL)  # mid-traffic
            server.kill()
            server = RPCQueueServer.spawn(port=port, key_file=rpc_key_file, data_dir=data)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        rest = []
        while True:
            try:
                rest.append(q.get(timeout=0.5))
            except queue.Empty:
                break
        everything = acked_gets + rest
        assert len(acked_puts) > 10
        # No acknowledged put lost; no item delivered twice (exactly-once across SIGKILL + restart).
        assert len(everything) == len(set(everything)), "an item was delivered twice"
        assert set(acked_puts) <= set(everything), f"lost: {sorted(set(acked_puts) - set(everything))[:10]}"
        assert set(everything) <= set(range(max(everything) + 1))
        assert acked_gets == sorted(acked_gets)  # one producer, one consumer: FIFO
        q.destroy()
    finally:
        server.stop()


@pytest.mark.spec("RPC14")
@pytest.mark.timeout(60)
def test_durable_store_file_mode_and_restart_keeps_items(tmp_path: Path, rpc_key_file: str) -> None:
    data = tmp_path / "d"
    with RPCQueueServer(key_file=rpc_key_file, data_dir=str(data)) as server:
        host, port = server.address
        q = resolve_descriptor(QueueDescriptor.create("rpc", "keep", 2, host=host, port=port, key_file=rpc_key_file))
        q.put_many(["a", "b"])
        assert q.get() == "a"
        q.put("c")
        q.close()
    assert stat.S_IMODE((data / "queues.sqlite3").stat().st_mode) == 0o600
    with RPCQueueServer(key_file=rpc_key_file, data_dir=str(data)) as server:
        host, port = server.address
        q = resolve_descriptor(
            QueueDescriptor.create("rpc", "keep", 2, host=host, port=port, key_file=rpc_key_file, create=False)
        )
        assert q.get_many(5) == ["b", "c"]
        s = q.stats()
        assert (s.puts, s.gets) == (3, 3)
        q.destroy()


def test_handle_class_is_registered() -> None:
    from sage_queue.registry import backend_class

    assert backend_class("rpc") is RPCQueueStub


@pytest.mark.spec("RPC9", "RPC10")
@pytest.mark.timeout(120)
def test_cut_connections_lose_and_duplicate_nothing(rpc_server: ServerProcess, rpc_key_file: str) -> None:
    from fault_injection.proxy import Proxy

    proxy = Proxy(rpc_server.address).start()
    try:
        host, port = proxy.address
        d = QueueDescriptor.create("rpc", f"cut_{os.getpid()}", 5, host=host, port=port, key_file=rpc_key_file)
        producer_q, consumer_q = resolve_descriptor(d), resolve_descriptor(d)
        got: list[int] = []
        errors: list[BaseException] = []
        stop = threading.Event()
        produced = [0]

        def produce() -> None:
            try:
                i = 0
                while not stop.is_set():
                    if i % 8:
                        producer_q.put_many([i, i + 1, i + 2, i + 3], timeout=60)
                    else:
                        for j in range(i, i + 4):
                            producer_q.put(j, timeout=60)
                    i += 4
                    produced[0] = i
                producer_q.put(None, timeout=60)
            except BaseException as exc:
                errors.append(exc)

        def consume() -> None:
            try:
                while True:
                    batch = consumer_q.get_many(3, timeout=60)
                    if batch[-1] is None:
                        got.extend(batch[:-1])
                        return
                    got.extend(batch)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
        for t in threads:
            t.start()
        while proxy.cuts < 12 and not errors:
            time.sleep(0.3)
            proxy.cut()  # requests and replies in flight are lost; the clients retransmit
        stop.set()
        for t in threads:
            t.join(90)
        assert not errors, errors[:3]
        assert not any(t.is_alive() for t in threads)
        n = produced[0]
        assert n > 100
        # Exactly once and in order: a retransmitted put was not enqueued twice, and a get whose answer
        # was lost returned the same items on retransmission, not the next ones.
        assert got == list(range(n))
        assert consumer_q.qsize() == 0
        s = consumer_q.stats()
        assert (s.puts, s.gets) == (n + 1, n + 1)
        consumer_q.destroy()
        producer_q.close()
    finally:
        proxy.stop()


@pytest.mark.spec("RPC1")
@pytest.mark.timeout(60)
def test_a_spawned_server_never_outlives_its_parent(rpc_key_file: str) -> None:
    code = (
        "import os, sys\n"
        "from sage_queue.backends.rpc.server import RPCQueueServer\n"
        f"s = RPCQueueServer.spawn(key_file={rpc_key_file!r})\n"
        "print(s.pid, flush=True)\n"
        "os._exit(0)  # no cleanup at all, as if killed\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    pid = int(out.stdout.strip())

    def running() -> bool:  # a zombie (exited, not yet reaped by whoever adopted it) is not running
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and running():
        time.sleep(0.05)
    alive = running()
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the spawned server outlived the process that spawned it"


@pytest.mark.spec("RPC2", "RPC10")
@pytest.mark.timeout(60)
def test_a_silent_parked_client_is_handed_no_item(
    rpc: RpcFactory, rpc_server: ServerProcess, rpc_key_file: str
) -> None:
    q = rpc()
    name, uid = q.descriptor.metadata["name"], q._uid
    raw = RawClient(rpc_server.address, load_key(rpc_key_file))
    raw.hello()
    parked = raw.frame(1, ["get", name, uid, 1, None])
    raw.send_raw(parked)
    assert raw.recv(timeout=0.5) is None  # parked, and then silent: no heartbeat
    time.sleep(8.0)  # > PARKED_SILENCE_S plus a sweep
    q.put("for the living")
    time.sleep(0.3)
    assert q.qsize() == 1, "the item went to a parked get whose client had gone silent"
    raw.send_raw(raw.frame(1, ["get", name, uid, 1, None]))  # alive after all: parked again, served
    assert raw.recv() == ["ok", [pickle.dumps("for the living", protocol=pickle.HIGHEST_PROTOCOL)]]
    assert q.qsize() == 0
    raw.close()


@pytest.mark.spec("RPC5")
@pytest.mark.timeout(60)
def test_authenticated_but_ill_formed_requests_get_an_error_and_change_nothing(
    rpc: RpcFactory, rpc_server: ServerProcess, rpc_key_file: str
) -> None:
    q = rpc(2)
    q.put("kept")
    name, uid = q.descriptor.metadata["name"], q._uid
    raw = RawClient(rpc_server.address, load_key(rpc_key_file))
    raw.hello()
    bad = [
        ["get", name, uid, 1, float("nan")],
        ["get", name, uid, 1, -1.0],
        ["get", name, uid, 0, 0.0],
        ["get", name, uid, "many", 0.0],
        ["put", name, uid, "not a list", None],
        ["put", name, uid, [1, 2], None],
        ["put", name, uid, [], None],
        # shaped like the server's fast path (one item, room, nobody parked): validated all the same
        ["put", name, uid, [b"x"], float("nan")],
        ["put", name, uid, [b"x"], -1.0],
        ["open", name, -5, True],
        ["open"],
        ["no such op", name, uid],
    ]
    before = status(q)["rejected_malformed"]
    for seq, body in enumerate(bad, start=1):
        reply = raw.call(seq, body)
        assert reply is not None and reply[:2] == ["err", "value"], (body, reply)
    raw.send_raw(raw.frame(len(bad) + 1, [{"a": 1}]))  # no op name at all: dropped unanswered
    assert raw.recv(timeout=0.5) is None
    assert status(q)["rejected_malformed"] - before == len(bad) + 1
    assert status(q)["internal_errors"] == 0
    assert q.qsize() == 1 and q.get(timeout=5) == "kept"
    raw.close()


@pytest.mark.spec("RPC3", "RPC4")
@pytest.mark.parametrize("key_len", [32, 64, 65, 200])
def test_sealer_mac_is_keyed_blake2b_and_tampering_is_caught(key_len: int) -> None:
    """The Sealer's copied keyed state gives exactly keyed BLAKE2b-256 with personalisation
    "sage-queue rpc" (RPC3), also for keys longer than BLAKE2b's 64 (hashed to 64 first); any changed
    byte fails the MAC; a key shorter than 32 bytes is refused (RPC4)."""
    key = os.urandom(key_len)
    sealer = Sealer(key)
    cid, instance = os.urandom(16), os.urandom(16)
    frame = sealer.seal(REQUEST_MAGIC, cid, 7, 1234.5, instance, ["put", "q", b"u", [b"item"], None])
    person = b"sage-queue rpc"
    mac_key = key if key_len <= 64 else hashlib.blake2b(key, digest_size=64, person=person).digest()
    assert frame[:32] == hashlib.blake2b(frame[32:], key=mac_key, digest_size=32, person=person).digest()
    with pytest.raises(ValueError, match="at least 32"):
        Sealer(key[:31])
    assert Sealer(key).open(frame, REQUEST_MAGIC, 1 << 20) == (
        cid,
        7,
        1234.5,
        instance,
        ["put", "q", b"u", [b"item"], None],
    )
    for i in (0, 31, 32, 40, len(frame) - 1):
        tampered = bytearray(frame)
        tampered[i] ^= 1
        with pytest.raises(BadFrame, match="auth"):
            sealer.open(bytes(tampered), REQUEST_MAGIC, 1 << 20)
    with pytest.raises(BadFrame, match="auth"):
        Sealer(os.urandom(key_len)).open(frame, REQUEST_MAGIC, 1 << 20)
    with pytest.raises(BadFrame, match="malformed"):  # only str/bytes map keys (msgpack's strict_map_key)
        sealer.open(sealer.seal(REQUEST_MAGIC, cid, 8, 1.0, instance, ["put", {1: 2}]), REQUEST_MAGIC, 1 << 20)
    with pytest.raises(BadFrame, match="malformed"):  # a reply is never taken for a request
        sealer.open(sealer.seal(REPLY_MAGIC, cid, 7, 1.0, instance, ["ok"]), REQUEST_MAGIC, 1 << 20)


@pytest.mark.spec("RPC1")
@pytest.mark.timeout(60)
def test_local_service_for_tools_that_need_a_server() -> None:
    from sage_queue.backends.rpc.server import local_service

    with local_service() as metadata:
        assert set(metadata) == {"host", "port", "key_file"}
        with resolve_descriptor(QueueDescriptor.create("rpc", "svc", **metadata)) as q:
            q.put(1)
            assert q.get(timeout=5) == 1
            q.destroy()
    assert not os.path.exists(metadata["key_file"])
    with pytest.raises(QueuePermissionError):  # the key went with the service
        resolve_descriptor(QueueDescriptor.create("rpc", "svc", **metadata))


@pytest.mark.spec("RPC8")
@pytest.mark.timeout(60)
def test_a_forked_child_uses_an_inherited_handle_with_its_own_sockets(rpc: RpcFactory) -> None:
    q = rpc()
    q.put("before fork")  # the parent's pool now holds a channel
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, just the handle, then _exit
        code = 1
        try:
            item = q.get(timeout=10)
            q.put(("child got", item))
            q.close()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    done, status_code = 0, 0
    while not done and time.monotonic() < deadline:
        done, status_code = os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    if not done:  # a child stuck in the parent's sockets: kill it, never leave it behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done, "the forked child hung using its inherited handle"
    assert os.waitstatus_to_exitcode(status_code) == 0
    assert q.get(timeout=10) == ("child got", "before fork")
    q.put("parent still works")
    assert q.get(timeout=10) == "parent still works"


@pytest.mark.spec("RPC9", "E16")
@pytest.mark.timeout(60)
def test_a_get_that_gave_up_on_a_stopped_server_takes_no_item(rpc_key_file: str) -> None:
    # The get reaches a SIGSTOPped server, gives up with QueueConnectionError, and the server executes
    # it after SIGCONT: the item must come back to the queue, not stay with the abandoned request.
    server = RPCQueueServer.spawn(key_file=rpc_key_file)
    try:
        host, port = server.address
        q = resolve_descriptor(QueueDescriptor.create("rpc", "stopped", host=host, port=port, key_file=rpc_key_file))
        q.put("kept")
        os.kill(server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(QueueConnectionError):
                q.get(timeout=0.5)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert q.get(timeout=10) == "kept"
        q.destroy()
    finally:
        server.stop()
