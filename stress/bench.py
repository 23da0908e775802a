"""``sage-queue bench``: backend throughput and latency against anchors measured in the same run.

Not a test: it prints numbers, ratios and a met / NOT met verdict per floor of the
backend's issue, and exits 0 unless a run fails outright. Every scenario runs each
contender ``--repeat`` times, interleaved (so load from other programs hits every
contender alike), in fresh ``spawn`` processes that get a backend queue as its
descriptor's JSON text and an anchor as the object itself. The median run is reported,
with the ratio of the backend to each anchor.

Scenarios
  single    1 producer process -> 1 consumer process, put/get of ("x"*64, 12345, 3.14);
            anchors multiprocessing.Queue and faster-fifo.
  batch     the same message through put_many/get_many of 100 (backends declaring
            "batch"); anchor faster-fifo's put_many/get_many.
  pingpong  round trip over two queues between two processes, after a warm-up: p50/p99
            in microseconds; anchors multiprocessing.Queue and faster-fifo.
  large     1 MiB bytes payloads: MB/s; anchors multiprocessing.Queue and faster-fifo,
            and two single-process memcpy references (ctypes.memmove of 1 MiB, best of
            3, measured in this process between the repeats): "cache-hot" copies into
            the same 1 MiB buffer every time (source and destination stay in cache),
            "streaming" walks its destination through 64 MiB, as a ring does. The
            sage floor is judged against the cache-hot one, the stricter.
  idle      a consumer blocked on an empty queue for --idle seconds: its CPU% (from
            time.process_time in the consumer), then the wake-up latency of puts made
            while it sleeps (p50/p99); anchor multiprocessing.Queue.
  rss       (only with --rss) a consumer takes --rss-messages messages (get_many of 100
            if the backend declares "batch") from a 4 MiB ring; its RSS (VmRSS) and
            private RSS (RssAnon) are sampled at every 10%. Flat means VmRSS grows by at
            most 1 MiB from the first sample to the last: a leak of even one byte per
            message would add 9 MB over the last 90% of 10M messages.

Both sides share the machine's cores (2 on the reference box): waiters must back off.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import queue
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from sage_queue import resolve_descriptor

from .backends import SEGMENT_BACKENDS, backends_for, descriptor_factory, unavailable_reason

MESSAGE = ("x" * 64, 12345, 3.14)
LARGE = 1 << 20
BATCH = 100
STREAM_SPAN = 64 << 20
RSS_RING_BYTES = 4 << 20  # small: every page of the ring is touched within the first 10% of the messages
RSS_FLAT_BYTES = 1 << 20
PINGPONG_WARMUP = 100
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


def _rss_sample() -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes: all resident pages (the shared ring's included), and private ones only."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0)


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


def _consumer(endpoint: Endpoint, count: int, batch: int, rss_marks: int, ready: Any, report: Any) -> None:
    ops = _Ops(endpoint)
    samples = []
    # RSS is sampled when `got` first reaches each of `rss_marks` evenly spaced marks.
    step = count // rss_marks if rss_marks else 0
    next_mark = step if step else count + 1
    ready.set()
    got = 0
    while got < count:
        if batch > 1:
            got += len(ops.get_many(batch))
        else:
            ops.get()
            got += 1
        if got >= next_mark:
            samples.append(_rss_sample())
            next_mark += step
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
    ctx: Any, contender: _Contender, count: int, batch: int, payload: Any, rss_marks: int = 0
) -> dict[str, Any]:
    if batch > 1:
        count = max(batch, count // batch * batch)  # the producer sends whole batches only
    endpoint, teardown = contender.make()
    ready, go, report = ctx.Event(), ctx.Event(), ctx.Queue()
    consumer = ctx.Process(target=_consumer, args=(endpoint, count, batch, rss_marks, ready, report))
    producer = ctx.Process(target=_producer, args=(endpoint, count, batch, payload, go, report))
    try:
        consumer.start()
        producer.start()
        ready.wait(60)
        time.sleep(0.2)  # let both sides finish importing before the clock starts
        go.set()
        messages = {}
        for _ in range(2):
            msg = report.get(timeout=600)
            messages[msg[0]] = msg
        _join([producer, consumer], 60)
        seconds = messages["consumer"][1] - messages["producer"][1]
        return {"msgs_per_s": count / seconds, "seconds": seconds, "count": count, "rss": messages["consumer"][2]}
    finally:
        for proc in (producer, consumer):
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        teardown()


def _pingpong(ctx: Any, contender: _Contender, rounds: int) -> dict[str, Any]:
    (out_ep, out_down), (back_ep, back_down) = contender.make(), contender.make()
    ready = ctx.Event()
    echo = ctx.Process(target=_echo, args=(out_ep, back_ep, PINGPONG_WARMUP + rounds, ready))
    try:
        echo.start()
        out_q, back_q = _Ops(out_ep), _Ops(back_ep)
        ready.wait(60)
        samples = []
        for i in range(PINGPONG_WARMUP + rounds):
            t0 = time.perf_counter_ns()
            out_q.put(MESSAGE)
            back_q.get()
            if i >= PINGPONG_WARMUP:  # the first round trips page in code and ring; not a steady state
                samples.append((time.perf_counter_ns() - t0) / 1e3)
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


def memcpy_mb_s(span: int, size: int = LARGE, rounds: int = 500) -> float:
    """MB/s of a single-process ``ctypes.memmove`` of ``size`` bytes, best of 3.

    The destination walks through ``span`` bytes: ``span == size`` is the cache-hot copy
    of one buffer onto another (both stay in cache); a span of 64 MiB streams through
    memory the way a ring's writes do. No allocation is timed (``bytes(bytearray)``
    would time malloc and page faults too).
    """
    source, destination = bytearray(os.urandom(size)), bytearray(span)
    source_view = (ctypes.c_char * size).from_buffer(source)
    base = ctypes.addressof((ctypes.c_char * span).from_buffer(destination))
    slots = span // size
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for i in range(rounds):
            ctypes.memmove(base + (i % slots) * size, source_view, size)
        best = max(best, size * rounds / (time.perf_counter() - start) / 1e6)
    return best


# -- floors: the issues' targets, judged from the numbers of this run ---------------------


@dataclass(frozen=True)
class Floor:
    """One target of a backend's issue: ``metric(results)`` compared with ``limit``."""

    issue: str
    text: str
    metric: Callable[[dict[str, Any]], Optional[float]]
    limit: float
    higher_is_better: bool
    unit: str

    def judge(self, results: dict[str, Any]) -> dict[str, Any]:
        try:
            value = self.metric(results)
        except (KeyError, ZeroDivisionError, IndexError, TypeError):
            value = None
        if value is None:
            return {"floor": self.text, "issue": self.issue, "value": None, "limit": self.limit, "met": None}
        met = value >= self.limit if self.higher_is_better else value <= self.limit
        return {"floor": self.text, "issue": self.issue, "value": value, "limit": self.limit, "met": met}

    def line(self, verdict: dict[str, Any]) -> str:
        head = f"floor: {self.text} ({self.issue}): "
        value = verdict["value"]
        if value is None:
            return head + "not measured in this run (scenario skipped)"
        shown = f"{value:.2f}{self.unit}"
        if verdict["met"]:
            return head + f"{shown} -> met"
        # "%" floors are percentages already: their gap is in percentage points, not a percent of a percent.
        unit = " percentage points" if self.unit == "%" else self.unit
        if self.higher_is_better:
            short = f"short by {self.limit - value:.2f}{unit}, {100 * (1 - value / self.limit):.0f}% below the floor"
        else:
            short = f"over by {value - self.limit:.2f}{unit}"
        return head + f"{shown} -> NOT met ({short})"


def _ratio(out: dict[str, Any], scenario: str, backend: str, anchor: str) -> float:
    med = out[scenario]["msgs_per_s"]
    return float(med[backend] / med[anchor])


def floors_for(backend: str) -> list[Floor]:
    """The floors of ``backend``'s issue (issue 4: shm, issue 5: sage); [] for others."""
    if backend == "shm":
        return [
            Floor(
                "issue 4",
                "shm single-item put/get >= 1.0x mp.Queue",
                lambda out: _ratio(out, "single", "shm", "mp.Queue"),
                1.0,
                True,
                "x",
            ),
            Floor(
                "issue 4",
                "shm blocked-waiter CPU < 5% of a core",
                lambda out: out["idle"]["shm"]["cpu_percent"],
                5.0,
                False,
                "%",
            ),
        ]
    if backend == "sage":
        return [
            Floor(
                "issue 5",
                "sage single-item put/get >= 5x mp.Queue",
                lambda out: _ratio(out, "single", "sage", "mp.Queue"),
                5.0,
                True,
                "x",
            ),
            Floor(
                "issue 5",
                "sage single-item put/get >= 3x faster-fifo",
                lambda out: _ratio(out, "single", "sage", "faster-fifo"),
                3.0,
                True,
                "x",
            ),
            Floor(
                "issue 5",
                "sage put_many/get_many of 100 >= 5x faster-fifo's",
                lambda out: _ratio(out, "batch", "sage", "faster-fifo"),
                5.0,
                True,
                "x",
            ),
            Floor(
                "issue 5",
                "sage ping-pong round trip p50 <= 10 us",
                lambda out: out["pingpong"]["sage"]["p50_us"],
                10.0,
                False,
                " us",
            ),
            Floor(
                "issue 5",
                "sage 1 MiB payloads >= 40% of cache-hot memcpy",
                lambda out: 100 * out["large"]["mb_per_s"]["sage"] / out["large"]["memcpy_cache_hot_mb_per_s"],
                40.0,
                True,
                "%",
            ),
            Floor(
                "issue 5",
                "sage consumer RSS flat over the rss run (VmRSS growth after the first 10% <= 1 MiB)",
                lambda out: (out["rss"]["vm_rss_bytes"][-1] - out["rss"]["vm_rss_bytes"][0]) / (1 << 20),
                RSS_FLAT_BYTES / (1 << 20),
                False,
                " MiB",
            ),
        ]
    return []


# -- driver ---------------------------------------------------------------------------------


def _median_runs(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[len(ordered) // 2]


def _fmt_ratio(value: float, anchor: float) -> str:
    return f"{value / anchor:.2f}x" if anchor else "n/a"


def _queue_class(backend: str) -> Any:
    from sage_queue.registry import QUEUE_STUB_MAPPING

    return QUEUE_STUB_MAPPING[backend]


def _interleaved(
    contenders: list[_Contender], repeat: int, run: Callable[[_Contender], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    for _ in range(repeat):
        for contender in contenders:
            runs[contender.name].append(run(contender))
    return runs


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sage-queue bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="all", choices=[*SEGMENT_BACKENDS, "all"])
    parser.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help=f"comma list of {ALL_SCENARIOS}")
    parser.add_argument("-n", "--messages", type=int, default=200_000, help="messages per single-item run")
    parser.add_argument("--batch-messages", type=int, default=1_000_000, help="messages per put_many/get_many run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender (median reported)")
    parser.add_argument("--rounds", type=int, default=5_000, help="ping-pong round trips (after 100 of warm-up)")
    parser.add_argument("--large", type=int, default=2_000, help="1 MiB messages per run")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds the idle consumer stays blocked")
    parser.add_argument("--wakes", type=int, default=50, help="wake-up latency samples")
    parser.add_argument("--rss", action="store_true", help="also sample a consumer's RSS over --rss-messages")
    parser.add_argument("--rss-messages", type=int, default=10_000_000, help="messages of the --rss run")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="draw the comparison (needs the 'plot' extra: matplotlib)")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    if min(args.messages, args.batch_messages, args.rounds, args.large, args.wakes, args.repeat) < 1:
        parser.error("message counts, --rounds, --wakes and --repeat must be at least 1")
    if args.rss and args.rss_messages < 10 * BATCH:
        parser.error(f"--rss-messages must be at least {10 * BATCH} (ten samples of whole batches)")
    ctx = multiprocessing.get_context("spawn")
    load = os.getloadavg()[0]
    results: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "argv": sys.argv[1:] if argv is None else argv,
        "load_average_1min_at_start": load,
        "backends": {},
    }
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
    print(
        f"python {results['python']}, {results['cpus']} cpus, median of {args.repeat} interleaved runs, "
        f"1-minute load average at start {load:.2f}"
    )

    for backend in backends:
        out: dict[str, Any] = {}
        results["backends"][backend] = out
        small = _backend_contender(backend, 64 << 20)
        capabilities: frozenset[str] = getattr(_queue_class(backend), "capabilities", frozenset())

        if "single" in scenarios:
            runs = _interleaved(
                [small, *anchors], args.repeat, lambda c: _throughput(ctx, c, args.messages, 1, MESSAGE)
            )
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
                runs = _interleaved(
                    [small, ff_anchor], args.repeat, lambda c: _throughput(ctx, c, args.batch_messages, BATCH, MESSAGE)
                )
                med = {name: _median_runs(r, "msgs_per_s")["msgs_per_s"] for name, r in runs.items()}
                out["batch"] = {"msgs_per_s": med, "runs": {k: [r["msgs_per_s"] for r in v] for k, v in runs.items()}}
                print(
                    f"[batch x{BATCH}] {backend}: {med[backend]:,.0f} msgs/s | faster-fifo: "
                    f"{med[ff_anchor.name]:,.0f} ({_fmt_ratio(med[backend], med[ff_anchor.name])})"
                )

        if "pingpong" in scenarios:
            pp = _interleaved([small, *anchors], args.repeat, lambda c: _pingpong(ctx, c, args.rounds))
            med_pp = {name: _median_runs(r, "p50_us") for name, r in pp.items()}
            out["pingpong"] = {**med_pp, "runs": pp}
            mine = med_pp[backend]
            line = f"[pingpong] {backend}: p50 {mine['p50_us']:.1f} us, p99 {mine['p99_us']:.1f} us"
            for anchor in anchors:
                base = med_pp[anchor.name]
                line += (
                    f" | {anchor.name}: p50 {base['p50_us']:.1f} us, p99 {base['p99_us']:.1f} us"
                    f" ({anchor.name} p50 / {backend} p50 = {base['p50_us'] / mine['p50_us']:.2f}x)"
                )
            print(line)

        if "large" in scenarios:
            payload = os.urandom(LARGE)
            big = _backend_contender(backend, 32 << 20)
            ff_big = _ff_contender(32 << 20)
            large_contenders = [big, mp_anchor, *([ff_big] if ff_big else [])]
            memcpy: dict[str, list[float]] = {"cache-hot": [], "streaming": []}
            runs = {c.name: [] for c in large_contenders}
            for _ in range(args.repeat):  # the memcpy references interleaved with the contenders too
                for contender in large_contenders:
                    runs[contender.name].append(_throughput(ctx, contender, args.large, 1, payload))
                memcpy["cache-hot"].append(memcpy_mb_s(span=LARGE))
                memcpy["streaming"].append(memcpy_mb_s(span=STREAM_SPAN))
            hot, stream = statistics.median(memcpy["cache-hot"]), statistics.median(memcpy["streaming"])
            med = {name: _median_runs(r, "msgs_per_s")["msgs_per_s"] * LARGE / 1e6 for name, r in runs.items()}
            out["large"] = {
                "mb_per_s": med,
                "memcpy_cache_hot_mb_per_s": hot,
                "memcpy_streaming_mb_per_s": stream,
                "memcpy_runs": memcpy,
            }
            line = (
                f"[large 1 MiB] {backend}: {med[backend]:,.0f} MB/s = {100 * med[backend] / hot:.1f}% of cache-hot "
                f"memcpy ({hot:,.0f} MB/s), {100 * med[backend] / stream:.1f}% of streaming memcpy ({stream:,.0f} MB/s)"
            )
            for name in runs:
                if name != backend:
                    line += f" | {name}: {med[name]:,.0f} MB/s ({_fmt_ratio(med[backend], med[name])})"
            print(line)

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
            rss_batch = BATCH if "batch" in capabilities else 1
            ring = _backend_contender(backend, RSS_RING_BYTES)
            run = _throughput(ctx, ring, args.rss_messages, rss_batch, MESSAGE, rss_marks=10)
            vm = [s[0] for s in run["rss"]]
            anon = [s[1] for s in run["rss"]]
            out["rss"] = {
                "messages": run["count"],
                "batch": rss_batch,
                "seconds": run["seconds"],
                "vm_rss_bytes": vm,
                "rss_anon_bytes": anon,
            }
            print(
                f"[rss] {backend} consumer over {run['count']:,} messages (get_many of {rss_batch}, "
                f"{run['seconds']:.1f} s), KiB at every 10%: VmRSS {[v // 1024 for v in vm]}, "
                f"RssAnon {[a // 1024 for a in anon]}; VmRSS growth after the first 10%: "
                f"{(vm[-1] - vm[0]) // 1024} KiB"
            )

        verdicts = []
        for floor in floors_for(backend):
            verdict = floor.judge(out)
            verdicts.append(verdict)
            print(floor.line(verdict))
        out["floors"] = verdicts

    results["load_average_1min_at_end"] = os.getloadavg()[0]
    print(f"1-minute load average at end {results['load_average_1min_at_end']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results written to {args.json}")
    if args.plot:
        from .plot import plot_results

        print(f"{plot_results(results, args.plot)} panels drawn to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
