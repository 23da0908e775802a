"""Benchmark of the rpc backend against raw pyzmq REQ/REP, in one run (issue 11 floors).

    python -m stress.bench_rpc [--seconds 2] [--payload 64] [--rounds 15] [--round-seconds 0.4]

Every server runs in its own process (the rpc server via ``RPCQueueServer.spawn``, the raw echo
server via this module's ``--echo`` mode), the clients in this process or in child processes, so
both sides pay the same IPC. Prints one line per measure and the ratios against the floors:

* round trips: rpc put and get (each one request-reply) per second / raw REQ/REP round trips per
  second, same payload (floor 0.8): ``--rounds`` interleaved pairs of rounds of ``--round-seconds``
  each, after one warm-up pair that is not counted (both sides start cold alike); the ratio is the
  median of the per-round ratios, all of which are printed (on a loaded machine single rounds
  scatter widely: 0.4x to 4x);
* put_many/get_many items per second (floor 200 000);
* 4 client processes in parallel / 1 (floor 1.5);
* CPU of a client blocked in get, and of the server meanwhile (floor < 1 % of a core).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import zmq

from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.backends.rpc.server import RPCQueueServer
from sage_queue.backends.rpc.wire import generate_key_file


def _echo_server(port_out: Any, stop: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    port_out.put(port)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if poller.poll(100):
            sock.send(sock.recv())
    sock.close(0)
    ctx.term()


def raw_round_trips(port: int, payload: bytes, seconds: float) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.connect(f"tcp://127.0.0.1:{port}")
    n = 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        for _ in range(100):
            sock.send(payload)
            sock.recv()
        n += 100
    rate = n / (time.perf_counter() - t0)
    sock.close(0)
    ctx.term()
    return rate


def rpc_round_trips(desc_json: str, payload: bytes, seconds: float) -> float:
    """put + get pairs, counted as two round trips each."""
    q = resolve_descriptor(desc_json)
    n = 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        for _ in range(50):
            q.put(payload)
            q.get()
        n += 100
    rate = n / (time.perf_counter() - t0)
    q.close()
    return rate


def _rpc_worker(desc_json: str, payload: bytes, seconds: float, out: Any, go: Any) -> None:
    go.wait()
    out.put(rpc_round_trips(desc_json, payload, seconds))


def batch_items(desc_json: str, seconds: float, batch: int = 10_000) -> float:
    q = resolve_descriptor(desc_json)
    items = list(range(batch))
    n = 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        q.put_many(items)
        left = batch
        while left:
            left -= len(q.get_many(batch))
        n += batch
    rate = n / (time.perf_counter() - t0)
    q.close()
    return rate


def idle_cpu(desc_json: str, server_pid: int, seconds: float) -> tuple[float, float]:
    """(client, server) CPU fraction of one core while a get is blocked for ``seconds``."""
    q = resolve_descriptor(desc_json)

    def server_cpu() -> float:
        with open(f"/proc/{server_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    blocked = threading.Thread(target=lambda: _get_quietly(q, seconds), daemon=True)
    blocked.start()
    time.sleep(0.3)
    c0, s0, t0 = time.process_time(), server_cpu(), time.monotonic()
    blocked.join(seconds + 5)
    c1, s1, t1 = time.process_time(), server_cpu(), time.monotonic()
    q.close()
    return (c1 - c0) / (t1 - t0), (s1 - s0) / (t1 - t0)


def _get_quietly(q: Any, seconds: float) -> None:
    import queue

    try:
        q.get(timeout=seconds)
    except queue.Empty:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress.bench_rpc", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved raw/rpc rounds for the ratio")
    parser.add_argument("--round-seconds", type=float, default=0.4, help="length of one raw or rpc round")
    args = parser.parse_args(argv)
    payload = os.urandom(args.payload)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        key_file = os.path.join(tmp, "k")
        generate_key_file(key_file)
        server = RPCQueueServer.spawn(key_file=key_file)
        port_q, stop = ctx.Queue(), ctx.Event()
        echo = ctx.Process(target=_echo_server, args=(port_q, stop))
        echo.start()
        try:
            echo_port = port_q.get(timeout=20)
            host, port = server.address

            def desc(name: str) -> str:
                return QueueDescriptor.create("rpc", name, host=host, port=port, key_file=key_file).to_json()

            # Interleaved rounds, so that load from other processes hits both sides alike; the ratio
            # reported is the median of the per-round ratios.
            raw_round_trips(echo_port, payload, args.round_seconds)  # warm-up pair, not counted
            rpc_round_trips(desc("rt"), payload, args.round_seconds)
            raws, ones = [], []
            for _ in range(args.rounds):
                raws.append(raw_round_trips(echo_port, payload, args.round_seconds))
                ones.append(rpc_round_trips(desc("rt"), payload, args.round_seconds))
            raw, one = statistics.median(raws), statistics.median(ones)
            ratio = statistics.median(o / r for o, r in zip(ones, raws, strict=True))
            print(f"raw pyzmq REQ/REP      {raw:12,.0f} round trips/s ({args.payload} B, median of {args.rounds})")
            print(f"rpc put/get            {one:12,.0f} round trips/s   ratio {ratio:.2f} (floor 0.80)")
            print("  per-round ratios       " + " ".join(f"{o / r:.2f}" for o, r in zip(ones, raws, strict=True)))
            print(
                f"  best rounds            raw {max(raws):,.0f}, rpc {max(ones):,.0f}: "
                f"ratio {max(ones) / max(raws):.2f} "
                "(each side's least disturbed round; the floor is judged on the median above)"
            )
            items = batch_items(desc("batch"), args.seconds)
            print(f"rpc put_many/get_many  {items:12,.0f} items/s        (floor 200,000)")
            out, go = ctx.Queue(), ctx.Event()
            workers = [
                ctx.Process(target=_rpc_worker, args=(desc(f"par{i}"), payload, args.seconds, out, go))
                for i in range(4)
            ]
            for w in workers:
                w.start()
            time.sleep(1.0)
            go.set()
            four = sum(out.get(timeout=60 + args.seconds) for _ in workers)
            for w in workers:
                w.join(30)
            print(f"rpc 4 client processes {four:12,.0f} round trips/s   ratio {four / one:.2f} vs 1 (floor 1.50)")
            client_cpu, server_cpu = idle_cpu(desc("idle"), server.pid, max(3.0, args.seconds))
            print(f"idle blocked get       client {client_cpu:.2%} + server {server_cpu:.2%} of a core (floor < 1%)")
            print(f"cpus: {os.cpu_count()}  python {sys.version.split()[0]}  libzmq {zmq.zmq_version()}")
        finally:
            stop.set()
            echo.join(10)
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
