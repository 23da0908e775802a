"""``sage-queue bench``: backend throughput and latency against anchors measured in the same run.

Not a test: it prints numbers and ratios, and exits 0 unless a run fails outright.
Every scenario runs each contender ``--repeat`` times, interleaved (so load from other
programs hits every contender alike), in fresh ``spawn`` processes that get a backend
queue as its descriptor's JSON text and an anchor as the object itself. The median run
is reported, with the ratio of the backend to each anchor.

Scenarios
  single    1 producer process -> 1 consumer process, put/get of ("x"*64, 12345, 3.14);
            anchors multiprocessing.Queue and faster-fifo.
  batch     the same message through put_many/get_many of 100 (backends declaring
            "batch"); anchor faster-fifo's put_many/get_many.
  pingpong  round trip over two queues between two processes: p50/p99 in microseconds;
            anchor multiprocessing.Queue.
  large     1 MiB bytes payloads: MB/s, against single-process memcpy bandwidth measured
            here (bytes(bytearray) copies) and multiprocessing.Queue.
  idle      a consumer blocked on an empty queue for --idle seconds: its CPU% (from
            time.process_time in the consumer), then the wake-up latency of puts made
            while it sleeps (p50/p99); anchor multiprocessing.Queue.
  rss       (only with --rss) the consumer's RSS sampled over the messages: flat or not.

Both sides share the machine's cores (2 on the reference box): waiters must back off.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

from sage_queue import resolve_descriptor

from .backends import SEGMENT_BACKENDS, backends_for, descriptor_factory, unavailable_reason

MESSAGE = ("x" * 64, 12345, 3.14)
LARGE = 1 << 20
ALL_SCENARIOS = ("single", "batch", "pingpong", "large", "idle")

# -- endpoints: a queue as a child process sees it -----------------------------------------

Endpoint = tuple[str, Any]
"""("desc", descriptor JSON) for a backend, ("mp", queue) or ("ff", queue) for an anchor."""


class _Ops:
    """put/get/put_many/get_many over any contender, with one calling convention."""

    def __init__(self, endpoint: Endpoint) -> None:
        kind, obj = endpoint
        self.kind = kind
        self.q = resolve_descriptor(obj) if kind == "desc" else obj

    def put(self, item: Any) -> None:
        self.q.put(item)

    def get(self) -> Any:
        return self.q.get()

    def get_timeout(self, timeout: float) -> Any:
        return self.q.get(timeout=timeout)

    def put_many(self, items: list[Any]) -> None:
        self.q.put_many(items)

    def get_many(self, n: int) -> list[Any]:
        if self.kind == "ff":
            result: list[Any] = self.q.get_many(max_messages_to_get=n)
            return result
        result = self.q.get_many(n)
        return result

    def close(self) -> None:
        if self.kind == "desc":
            self.q.close()


def _rss_bytes() -> int:
    """Private (anonymous) resident memory: the shared ring's pages, touched as it fills, are not a leak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


# -- child processes (top level: spawn imports them) --------------------------------------

def _producer(endpoint: Endpoint, count: int, batch: int, payload: Any, go: Any, report: Any) -> None:
    ops = _Ops(endpoint)
    go.wait()
    start = time.monotonic()
    if batch > 1:
        items = [payload] * batch
        for _ in range(count // batch):
            ops.put_many(items)
    else:
        for _ in range(count):
            ops.put(payload)
    report.put(("producer", start))
    ops.close()


def _consumer(endpoint: Endpoint, count: int, batch: int, rss_every: int, ready: Any, report: Any) -> None:
    ops = _Ops(endpoint)
    samples = []
    ready.set()
    got = 0
    while got < count:
        if batch > 1:
            got += len(ops.get_many(batch))
        else:
            ops.get()
            got += 1
        if rss_every and got % rss_every < max(1, batch):
            samples.append(_rss_bytes())
    report.put(("consumer", time.monotonic(), samples))
    ops.close()


def _echo(inbound: Endpoint, outbound: Endpoint, rounds: int, ready: Any) -> None:
    a, b = _Ops(inbound), _Ops(outbound)
    ready.set()
    for _ in range(rounds):
        b.put(a.get())
    a.close()
    b.close()


def _sleeper(endpoint: Endpoint, idle: float, wakes: int, ready: Any, report: Any) -> None:
    ops = _Ops(endpoint)
    ready.set()
    cpu0, wall0 = time.process_time(), time.monotonic()
    try:
        ops.get_timeout(idle)
    except queue.Empty:
        pass
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    latencies = []
    for _ in range(wakes):
        sent = ops.get()
        latencies.append(time.monotonic() - sent)
    report.put(("idle", cpu, wall, latencies))
    ops.close()


# -- contenders -----------------------------------------------------------------------------

class _Contender:
    """Makes a fresh queue per run and tears it down after."""

    def __init__(self, name: str, make: Callable[[], tuple[Endpoint, Callable[[], None]]]) -> None:
        self.name = name
        self.make = make


def _backend_contender(backend: str, capacity: int) -> _Contender:
    factory = descriptor_factory(backend, capacity_bytes=capacity, prefix="bench")

    def make() -> tuple[Endpoint, Callable[[], None]]:
        desc = factory()
        owner = resolve_descriptor(desc)
        return ("desc", desc.to_json()), owner.destroy

    return _Contender(backend, make)


def _mp_contender(ctx: Any) -> _Contender:
    def make() -> tuple[Endpoint, Callable[[], None]]:
        q = ctx.Queue()
        return ("mp", q), q.close

    return _Contender("mp.Queue", make)


def _ff_contender(capacity: int) -> Optional[_Contender]:
    try:
        import faster_fifo
        import faster_fifo_reduction  # type: ignore[import-untyped]  # noqa: F401  (pickling of faster_fifo queues)
    except ImportError:
        return None

    def make() -> tuple[Endpoint, Callable[[], None]]:
        q = faster_fifo.Queue(max_size_bytes=capacity)
        return ("ff", q), lambda: None

    return _Contender("faster-fifo", make)


# -- scenario runners ----------------------------------------------------------------------

def _join(procs: list[Any], timeout: float) -> None:
    end = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.1, end - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        proc.kill()
        proc.join(5)
    if alive:
        raise RuntimeError(f"{len(alive)} benchmark process(es) did not finish in {timeout} s")


def _throughput(
    ctx: Any, contender: _Contender, count: int, batch: int, payload: Any, rss_every: int = 0
) -> dict[str, Any]:
    endpoint, teardown = contender.make()
    ready, go, report = ctx.Event(), ctx.Event(), ctx.Queue()
    consumer = ctx.Process(target=_consumer, args=(endpoint, count, batch, rss_every, ready, report))
    producer = ctx.Process(target=_producer, args=(endpoint, count, batch, payload, go, report))
    try:
        consumer.start()
        producer.start()
        ready.wait(60)
        time.sleep(0.2)  # let both sides finish importing before the clock starts
        go.set()
        messages = {}
        for _ in range(2):
            msg = report.get(timeout=300)
            messages[msg[0]] = msg
        _join([producer, consumer], 60)
        seconds = messages["consumer"][1] - messages["producer"][1]
        return {"msgs_per_s": count / seconds, "seconds": seconds, "rss": messages["consumer"][2]}
    finally:
        for proc in (producer, consumer):
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        teardown()


def _pingpong(ctx: Any, contender: _Contender, rounds: int) -> dict[str, Any]:
    (out_ep, out_down), (back_ep, back_down) = contender.make(), contender.make()
    ready = ctx.Event()
    echo = ctx.Process(target=_echo, args=(out_ep, back_ep, rounds, ready))
    try:
        echo.start()
        out_q, back_q = _Ops(out_ep), _Ops(back_ep)
        ready.wait(60)
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            out_q.put(MESSAGE)
            back_q.get()
            samples.append((time.perf_counter() - t0) * 1e6)
        _join([echo], 30)
        out_q.close()
        back_q.close()
        samples.sort()
        return {"p50_us": samples[len(samples) // 2], "p99_us": samples[int(len(samples) * 0.99)]}
    finally:
        if echo.is_alive():
            echo.kill()
            echo.join(5)
        out_down()
        back_down()


def _idle(ctx: Any, contender: _Contender, idle: float, wakes: int) -> dict[str, Any]:
    endpoint, teardown = contender.make()
    ready, report = ctx.Event(), ctx.Queue()
    sleeper = ctx.Process(target=_sleeper, args=(endpoint, idle, wakes, ready, report))
    try:
        sleeper.start()
        ops = _Ops(endpoint)
        ready.wait(60)
        time.sleep(idle + 0.3)  # its timed get has run out; it is now blocked in get() without timeout
        for _ in range(wakes):
            time.sleep(0.02)  # long enough for the consumer to go back to sleep
            ops.put(time.monotonic())
        _, cpu, wall, latencies = report.get(timeout=60)
        _join([sleeper], 30)
        ops.close()
        latencies.sort()
        return {
            "cpu_percent": 100.0 * cpu / wall,
            "wake_p50_us": latencies[len(latencies) // 2] * 1e6,
            "wake_p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        }
    finally:
        if sleeper.is_alive():
            sleeper.kill()
            sleeper.join(5)
        teardown()


def _memcpy_mb_s(size: int = LARGE, rounds: int = 200) -> float:
    source = bytearray(os.urandom(size))
    start = time.perf_counter()
    for _ in range(rounds):
        bytes(source)
    return size * rounds / (time.perf_counter() - start) / 1e6


# -- driver ---------------------------------------------------------------------------------

def _median_runs(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[len(ordered) // 2]


def _fmt_ratio(value: float, anchor: float) -> str:
    return f"{value / anchor:.2f}x" if anchor else "n/a"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sage-queue bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="all", choices=[*SEGMENT_BACKENDS, "all"])
    parser.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help=f"comma list of {ALL_SCENARIOS}")
    parser.add_argument("-n", "--messages", type=int, default=100_000, help="messages per throughput run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender (median reported)")
    parser.add_argument("--rounds", type=int, default=5_000, help="ping-pong round trips")
    parser.add_argument("--large", type=int, default=300, help="1 MiB messages per run")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds the idle consumer stays blocked")
    parser.add_argument("--wakes", type=int, default=50, help="wake-up latency samples")
    parser.add_argument("--rss", action="store_true", help="also sample the consumer's RSS over the messages")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "backends": {}}
    backends = []
    for backend in backends_for(args.backend):
        reason = unavailable_reason(backend)
        if reason:
            print(f"{backend}: skipped ({reason})")
            results["backends"][backend] = {"skipped": reason}
        else:
            backends.append(backend)
    if not backends:
        return 0
    mp_anchor = _mp_contender(ctx)
    ff_anchor = _ff_contender(64 << 20)
    anchors = [a for a in (mp_anchor, ff_anchor) if a is not None]
    print(f"python {results['python']}, {results['cpus']} cpus, median of {args.repeat} interleaved runs")

    for backend in backends:
        out: dict[str, Any] = {}
        results["backends"][backend] = out
        small = _backend_contender(backend, 64 << 20)
        capabilities: frozenset[str] = getattr(QUEUE_CLASS(backend), "capabilities", frozenset())

        if "single" in scenarios:
            runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in [small, *anchors]}
            for _ in range(args.repeat):
                for contender in [small, *anchors]:
                    runs[contender.name].append(_throughput(ctx, contender, args.messages, 1, MESSAGE))
            med = {name: _median_runs(r, "msgs_per_s")["msgs_per_s"] for name, r in runs.items()}
            out["single"] = {"msgs_per_s": med, "runs": {k: [r["msgs_per_s"] for r in v] for k, v in runs.items()}}
            line = f"[single] {backend}: {med[backend]:,.0f} msgs/s"
            for anchor in anchors:
                line += f" | {anchor.name}: {med[anchor.name]:,.0f} ({_fmt_ratio(med[backend], med[anchor.name])})"
            print(line)

        if "batch" in scenarios:
            if "batch" not in capabilities:
                print(f"[batch] {backend}: skipped (backend does not declare 'batch')")
            elif ff_anchor is None:
                print("[batch] skipped (faster-fifo not installed)")
            else:
                runs = {small.name: [], ff_anchor.name: []}
                for _ in range(args.repeat):
                    for contender in (small, ff_anchor):
                        runs[contender.name].append(_throughput(ctx, contender, args.messages, 100, MESSAGE))
                med = {name: _median_runs(r, "msgs_per_s")["msgs_per_s"] for name, r in runs.items()}
                out["batch"] = {"msgs_per_s": med}
                print(
                    f"[batch x100] {backend}: {med[backend]:,.0f} msgs/s | faster-fifo: "
                    f"{med[ff_anchor.name]:,.0f} ({_fmt_ratio(med[backend], med[ff_anchor.name])})"
                )

        if "pingpong" in scenarios:
            pp: dict[str, list[dict[str, Any]]] = {small.name: [], mp_anchor.name: []}
            for _ in range(args.repeat):
                for contender in (small, mp_anchor):
                    pp[contender.name].append(_pingpong(ctx, contender, args.rounds))
            med_pp = {name: _median_runs(r, "p50_us") for name, r in pp.items()}
            out["pingpong"] = med_pp
            mine, base = med_pp[backend], med_pp[mp_anchor.name]
            print(
                f"[pingpong] {backend}: p50 {mine['p50_us']:.1f} us, p99 {mine['p99_us']:.1f} us | mp.Queue: "
                f"p50 {base['p50_us']:.1f} us, p99 {base['p99_us']:.1f} us "
                f"(mp.Queue p50 / {backend} p50 = {base['p50_us'] / mine['p50_us']:.2f}x)"
            )

        if "large" in scenarios:
            payload = bytes(LARGE)
            big = _backend_contender(backend, 16 << 20)
            runs = {big.name: [], mp_anchor.name: []}
            for _ in range(args.repeat):
                for contender in (big, mp_anchor):
                    runs[contender.name].append(_throughput(ctx, contender, args.large, 1, payload))
            memcpy = _memcpy_mb_s()
            med = {name: _median_runs(r, "msgs_per_s")["msgs_per_s"] * LARGE / 1e6 for name, r in runs.items()}
            out["large"] = {"mb_per_s": med, "memcpy_mb_per_s": memcpy}
            print(
                f"[large 1 MiB] {backend}: {med[backend]:,.0f} MB/s ({100 * med[backend] / memcpy:.1f}% of "
                f"single-process memcpy {memcpy:,.0f} MB/s) | mp.Queue: {med[mp_anchor.name]:,.0f} MB/s "
                f"({_fmt_ratio(med[backend], med[mp_anchor.name])})"
            )

        if "idle" in scenarios:
            idle = {c.name: _idle(ctx, c, args.idle, args.wakes) for c in (small, mp_anchor)}
            out["idle"] = idle
            mine, base = idle[backend], idle[mp_anchor.name]
            print(
                f"[idle] {backend}: blocked-waiter CPU {mine['cpu_percent']:.2f}%, wake p50 "
                f"{mine['wake_p50_us']:.0f} us p99 {mine['wake_p99_us']:.0f} us | mp.Queue: CPU "
                f"{base['cpu_percent']:.2f}%, wake p50 {base['wake_p50_us']:.0f} us "
                f"p99 {base['wake_p99_us']:.0f} us"
            )

        if args.rss:
            run = _throughput(ctx, small, args.messages, 1, MESSAGE, rss_every=max(1, args.messages // 10))
            mib = [round(s / (1 << 20), 1) for s in run["rss"]]
            out["rss_mib"] = mib
            print(f"[rss] {backend} consumer private RSS (RssAnon, MiB) every {args.messages // 10} messages: {mib}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results written to {args.json}")
    return 0


def QUEUE_CLASS(backend: str) -> Any:
    from sage_queue.registry import QUEUE_STUB_MAPPING

    return QUEUE_STUB_MAPPING[backend]


if __name__ == "__main__":
    sys.exit(main())
