"""Every named scenario runs for real (real SIGKILL / SIGSTOP of real processes) on every backend with a
promise, and the harness fails fast. The checker's verdicts themselves: test_harness_checker.py.

Short runs (the scenarios' default fault counts); ``make soak`` / SAGE_SOAK=1 runs the long ones.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from _helpers import fail_in

from fault_injection.cli import main as faults_main
from fault_injection.core import run_faults, run_scenario
from fault_injection.proxy import Proxy
from fault_injection.scenarios import all_scenarios
from sage_queue import QueueConnectionError, resolve_descriptor
from stress.backends import descriptor_factory, harness_backends, unavailable_reason
from stress.checker import PROMISES, CheckReport, Promise
from stress.runner import FaultContext, RunResult, Scenario, Service, Target, run, target_for

FAIL_FAST_SECONDS = 10.0
"""A run that fails fast reports well within this; without fail-fast these runs take far longer."""
SOAK = os.environ.get("SAGE_SOAK") == "1"
SCENARIOS = ["kill-producers", "kill-consumers", "kill-any", "stop-resume", "kill-all-restart"]


SERVICE_SCENARIOS = {"cut-connections": "rpc", "kill-server": "rpc", "kill-actor": "ray_actor"}
"""Scenarios that fault a service, with a type they apply to: run in tests/rpc/test_rpc_faults.py and
tests/ray/test_ray_faults.py (where their services run)."""


def test_the_registry_lists_at_least_the_required_scenarios() -> None:
    known = all_scenarios()
    assert set(SCENARIOS) | set(SERVICE_SCENARIOS) <= set(known)
    for name, queue_type in SERVICE_SCENARIOS.items():  # they apply where they should, and not to shm
        if unavailable_reason(queue_type) is None:
            assert known[name].applies_to(target_for(queue_type)), name
        assert not known[name].applies_to(target_for("shm")), name
    assert all(s.description and s.faults > 0 for s in known.values())


# Ray's types run their scenarios in tests/ray/test_ray_faults.py: Ray starts only there (its xdist group).
JUDGED = [b for b in harness_backends() if b in PROMISES and not b.startswith("ray")]


@pytest.mark.timeout(1800 if SOAK else 60)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("backend", JUDGED)
def test_scenario_on_backend_keeps_its_promise(backend: str, scenario: str) -> None:
    if unavailable_reason(backend):
        pytest.skip(f"{backend}: {unavailable_reason(backend)}")
    target = target_for(backend, capacity_bytes=16 * 1024, prefix="tscen")
    result = run_scenario(
        target, scenario, soak=SOAK, seed=1234, batch=4 if scenario == "kill-consumers" else 1, drain_timeout=60
    )
    assert result.ok, result.summary()
    report = result.report
    assert report is not None and report.seed == 1234 and report.got > 0
    if scenario.startswith("kill"):
        assert result.kills >= all_scenarios()[scenario].faults
    else:
        assert result.stops == 3 or SOAK
        assert report.lost_bound == 0  # nobody killed: nothing may be lost


@pytest.mark.timeout(60)
def test_an_anchor_through_module_attr_is_counted_not_judged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # multiprocessing.Queue, kill-consumers: a consumer killed inside get holds the queue's
    # reader lock for ever, so the run stalls; the report still has the counts.
    report = tmp_path / "r.json"
    status = faults_main(
        [
            "--backend",
            "stress.anchors:mp_queue",
            "--scenario",
            "kill-consumers",
            "-k",
            "6",
            "--seed",
            "3",
            "--drain-timeout",
            "3",
            "--no-progress",
            "--report",
            str(report),
        ]
    )
    assert status == 0  # no promise, so nothing broken
    [run] = json.loads(report.read_text())["runs"]
    assert run["seed"] == 3 and run["verdict"] == "no promise" and run["kills"] == 6
    assert run["report"]["acked"] > 0
    assert "stress.anchors:mp_queue" in capsys.readouterr().out


def test_an_unjudged_run_is_no_promise_even_when_nothing_went_wrong() -> None:
    # The anchor test above saw "OK" once: mp.Queue happened not to stall (no consumer was killed
    # holding its reader lock), so the run had no problems, and an unjudged run without problems
    # was called OK. A verdict on a queue that promised nothing must not read as a pass.
    quiet = RunResult("stress.anchors:mp_queue", "kill-consumers", 3, report=CheckReport("none", judged=False))
    assert quiet.verdict == "no promise"
    stalled = RunResult("stress.anchors:mp_queue", "kill-consumers", 3, report=CheckReport("none", judged=False))
    stalled.problems.append("deadlock")
    assert stalled.verdict == "no promise"
    judged = RunResult("shm", "kill-consumers", 3, report=CheckReport("shm"))
    assert judged.verdict == "OK"
    judged.problems.append("2 lost")
    assert judged.verdict == "BROKEN"
    assert RunResult("shm", "kill-consumers", 3, problems=["no worker ready"]).verdict == "BROKEN"


@pytest.mark.timeout(60)
def test_the_cli_lists_scenarios_and_reports_a_seeded_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert faults_main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in SCENARIOS)
    report = tmp_path / "r.json"
    assert (
        faults_main(
            [
                "--backend",
                "shm",
                "--scenario",
                "kill-producers",
                "-k",
                "3",
                "--seed",
                "11",
                "--no-progress",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    out = json.loads(report.read_text())
    assert out["verdict"] == "OK" and out["runs"][0]["seed"] == 11
    assert "seed 11" in capsys.readouterr().out


# -- fail fast, with real processes ----------------------------------------------------------


def _run(hook: functools.partial[None], *, kills: int, drain_timeout: float = 60.0) -> tuple[RunResult, float]:
    start = time.monotonic()
    result = run_faults(
        descriptor_factory("shm", capacity_bytes=4096, prefix="tfaultfast"),
        producers=2,
        consumers=2,
        kills=kills,
        drain_timeout=drain_timeout,
        worker_hook=hook,
    )
    return result, time.monotonic() - start


@pytest.mark.timeout(30)
def test_a_consumer_exiting_on_its_own_fails_fast() -> None:
    # 2000 kills would take about a minute: the run must stop at the first unexpected death.
    result, seconds = _run(functools.partial(fail_in, "consumer", 0, 20, "exit"), kills=2000)
    assert seconds < FAIL_FAST_SECONDS, result.summary()
    assert result.kills < 2000
    [problem] = result.problems
    assert problem.startswith("consumer 0.") and "(pid " in problem and "died: exit code 3" in problem, problem


@pytest.mark.timeout(30)
def test_a_producer_raising_fails_fast_with_its_traceback() -> None:
    result, seconds = _run(functools.partial(fail_in, "producer", 1, 5, "raise"), kills=2000)
    assert seconds < FAIL_FAST_SECONDS, result.summary()
    [problem] = result.problems
    assert problem.startswith("producer 1.") and "died: exit code 1" in problem, problem
    assert "ValueError: injected by the test" in problem  # its stderr, captured


@pytest.mark.timeout(30)
def test_a_consumer_stuck_in_the_drain_is_named_with_its_stack() -> None:
    result, seconds = _run(functools.partial(fail_in, "consumer", 1, 0, "hang"), kills=5, drain_timeout=2.0)
    assert seconds < FAIL_FAST_SECONDS, result.summary()
    assert "not finished within 2.0 s" in result.problems[0], result.problems
    stuck = [p for p in result.problems if p.startswith("consumer 1.")]
    assert len(stuck) == 1 and "still running" in stuck[0] and "log bytes" in stuck[0], result.problems
    assert "in _hang" in stuck[0]  # faulthandler's dump says where it waits


@pytest.mark.timeout(60)
def test_workers_that_wait_out_a_stop_stay_until_the_drain() -> None:
    # With the only producer stopped, consumers time out again and again: they must keep
    # calling, not take their timeouts for an orphaning and leave (an old harness bug, where a
    # forkserver child compared its parent with the harness's pid).
    target = target_for("sage", capacity_bytes=16 * 1024, prefix="tstop")
    result = run_scenario(target, "stop-resume", faults=2, producers=1, consumers=2, seed=5, drain_timeout=30)
    assert result.ok, result.summary()
    assert result.stops == 2 and result.report is not None and result.report.got > 0


def _leave_quietly(role: str, index: int, done: int) -> None:
    if role == "consumer" and index == 0 and done >= 10:
        os._exit(0)


@pytest.mark.timeout(30)
def test_a_worker_leaving_with_code_0_before_the_drain_fails_fast() -> None:
    start = time.monotonic()
    result = run_faults(
        descriptor_factory("shm", capacity_bytes=4096, prefix="tfaultfast"), kills=2000, worker_hook=_leave_quietly
    )
    assert time.monotonic() - start < FAIL_FAST_SECONDS, result.summary()
    assert any(p.startswith("consumer 0.") and "exited early with code 0" in p for p in result.problems), (
        result.problems
    )


# -- errors a promise declares survivable, and services ----------------------------------------


class _Flaky:
    """A ``multiprocessing.Queue`` whose every 5th call in each process raises ``error`` before doing anything,
    as an rpc call does when a cut outlasts its retry deadline (E16): the harness's workers must log it and go on."""

    def __init__(self, maxsize: int, error: type[BaseException]) -> None:
        self.q = multiprocessing.get_context("fork").Queue(maxsize)
        self.error = error
        self.calls = 0

    def _call(self) -> None:
        self.calls += 1
        if self.calls % 5 == 0:
            raise self.error("injected by the test")

    def put(self, item: Any, timeout: Optional[float] = None) -> None:
        self._call()
        self.q.put(item, timeout=timeout)

    def get(self, timeout: Optional[float] = None) -> Any:
        self._call()
        return self.q.get(timeout=timeout)

    def qsize(self) -> int:
        return self.q.qsize()

    def close(self) -> None:
        self.q.close()


def _flaky_target(error: type[BaseException]) -> Target:
    promise = Promise("test: QueueConnectionError survivable", (), survivable=("QueueConnectionError",))
    return Target(
        "flaky",
        "object",
        promise,
        factory=lambda maxsize: _Flaky(maxsize, error),
        batch=False,
        processes="multiprocessing",
    )


@pytest.mark.timeout(60)
def test_workers_log_a_survivable_error_and_go_on() -> None:
    result = run(_flaky_target(QueueConnectionError), items_per_producer=100, seed=3, drain_timeout=30)
    assert result.ok, result.summary()
    report = result.report
    assert report is not None and report.failed > 0 and report.lost == 0
    # Every 5th call of a producer failed before putting: those items are indeterminate, never got.
    assert report.indeterminate > 0 and report.indeterminate_delivered == 0
    assert report.acked == report.got == 2 * 100 - report.indeterminate


@pytest.mark.timeout(60)
def test_an_error_not_declared_survivable_still_kills_the_worker_and_fails_the_run() -> None:
    result = run(_flaky_target(QueueBrokenForTest), items_per_producer=100, seed=3, drain_timeout=30)
    assert not result.ok
    assert any("died: exit code 1" in p and "QueueBrokenForTest" in p for p in result.problems), result.problems


class QueueBrokenForTest(Exception):
    pass


@pytest.mark.timeout(60)
def test_a_backend_that_needs_a_service_gets_one_for_the_run_and_it_stops_after() -> None:
    pytest.importorskip("zmq", reason="rpc needs pyzmq")
    target = target_for("rpc", prefix="tsvc")
    assert target.service is not None  # rpc's local_service: a throw-away server
    seen: list[Service] = []

    class Probe(Scenario):
        name = "probe"
        modes = ("descriptor",)

        def inject(self, ctx: FaultContext) -> None:
            seen.append(ctx.service)
            assert ctx.descriptor is not None and ctx.descriptor.metadata["port"] == ctx.service.metadata["port"]
            ctx.wait_ready(ctx.workers())
            with resolve_descriptor(ctx.descriptor) as q:  # through the service: items flow (bounded wait)
                end = time.monotonic() + 20
                while q.stats().gets < 10 and time.monotonic() < end:
                    ctx.sleep(0.1)

    result = run(target, scenario=Probe(), faults=0, seed=1, drain_timeout=30)
    assert result.ok, result.summary()
    assert result.report is not None and result.report.got > 0
    [service] = seen
    assert {"host", "port", "key_file"} <= set(service.metadata)
    # Stopped with the run: its key file is gone and nothing listens on its port any more.
    assert not os.path.exists(service.metadata["key_file"])
    with pytest.raises(OSError):
        socket.create_connection((service.metadata["host"], service.metadata["port"]), timeout=1).close()


# -- the faulting proxy (fault_injection/proxy.py), on real loopback sockets ---------------------


class _Echo:
    """A loopback TCP echo server in a thread (one thread per connection)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def echo_proxy() -> Iterator[Proxy]:
    echo = _Echo()
    proxy = Proxy(echo.address).start()
    try:
        yield proxy
    finally:
        proxy.stop()
        echo.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


@pytest.mark.timeout(30)
def test_the_proxy_forwards_then_resets_every_connection(echo_proxy: Proxy) -> None:
    with socket.create_connection(echo_proxy.address, timeout=5) as c:
        c.sendall(b"hello")
        assert _recv_exactly(c, 5) == b"hello"
        echo_proxy.set_mode("reset")  # returns once the live connections are reset
        with pytest.raises(ConnectionError):  # RST: reset (or, at worst, closed)
            c.sendall(b"x")
            _recv_exactly(c, 1)
    assert echo_proxy.cuts == 1 and echo_proxy.resets >= 1
    with pytest.raises(ConnectionError):  # new ones too, while in reset (the connect itself may see the RST)
        with socket.create_connection(echo_proxy.address, timeout=5) as c:
            c.sendall(b"x")
            _recv_exactly(c, 1)
    echo_proxy.set_mode("pass")
    with socket.create_connection(echo_proxy.address, timeout=5) as c:
        c.sendall(b"back")
        assert _recv_exactly(c, 4) == b"back"


@pytest.mark.timeout(30)
def test_the_proxy_blackhole_holds_bytes_until_it_ends(echo_proxy: Proxy) -> None:
    with socket.create_connection(echo_proxy.address, timeout=5) as c:
        c.sendall(b"a")
        assert _recv_exactly(c, 1) == b"a"
        echo_proxy.set_mode("blackhole")
        c.sendall(b"held")
        c.settimeout(0.5)
        with pytest.raises(socket.timeout):
            c.recv(10)  # nothing moves
        echo_proxy.set_mode("pass")
        c.settimeout(5)
        assert _recv_exactly(c, 4) == b"held"  # arrives once the partition heals


@pytest.mark.timeout(30)
def test_the_proxy_delays_and_throttles(echo_proxy: Proxy) -> None:
    with pytest.raises(ValueError):
        echo_proxy.set_mode("delay")  # needs delay > 0
    with pytest.raises(ValueError):
        echo_proxy.set_mode("teleport")
    with socket.create_connection(echo_proxy.address, timeout=10) as c:
        echo_proxy.set_mode("delay", delay=0.3)
        start = time.monotonic()
        c.sendall(b"late")
        assert _recv_exactly(c, 4) == b"late"
        assert time.monotonic() - start >= 0.6  # 0.3 s each way (a lower bound: never flaky)
        echo_proxy.set_mode("slow", rate=20_000)
        start = time.monotonic()
        c.sendall(b"z" * 30_000)
        assert _recv_exactly(c, 30_000) == b"z" * 30_000
        assert time.monotonic() - start >= 1.0  # 30 kB at 20 kB/s, each way
    assert echo_proxy.forwarded > 30_000  # counted after each send: the last echo bytes may not be yet


def _env_is(name: str, value: str, role: str, index: int, done: int) -> None:
    if os.environ.get(name) != value:
        raise RuntimeError(f"worker environment: {name}={os.environ.get(name)!r}, harness has {value!r}")


@pytest.mark.timeout(60)
def test_workers_see_the_harness_environment_even_with_an_older_fork_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Workers of registered types are forked by a fork server that keeps the environment it started with.
    # A variable the harness gets later (Ray's ray.init sets RAY_AUTH_MODE=token, without which a worker
    # cannot join the harness's cluster) must still reach them.
    factory = descriptor_factory("shm", capacity_bytes=4096, prefix="tenv")
    first = run(Target("shm", "descriptor", PROMISES["shm"], make_descriptor=factory), items_per_producer=5, seed=1)
    assert first.ok, first.summary()  # the fork server runs now, without the variable
    monkeypatch.setenv("SAGEQ_HARNESS_ENV_PROBE", "set after the fork server started")
    hook = functools.partial(_env_is, "SAGEQ_HARNESS_ENV_PROBE", "set after the fork server started")
    result = run(
        Target("shm", "descriptor", PROMISES["shm"], make_descriptor=factory), items_per_producer=5, seed=1, hook=hook
    )
    assert result.ok, result.summary()
