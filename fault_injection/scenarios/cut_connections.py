"""cut-connections: the network between rpc clients and their server resets, blackholes, delays and throttles.

Every descriptor of the run points at a :class:`fault_injection.proxy.Proxy` in front of the
backend's throw-away server (``local_service``), so workers and the harness's own handle reach
the server only through it. Each fault puts the proxy in one mode, drawn from the run's rng,
for a drawn time, then back to ``pass`` for a while:

* ``reset``: every live connection and every new one is reset (requests and replies in flight lost);
* ``blackhole``: nothing moves, sometimes for longer than a timed call's grace (its timeout + 2 s,
  RPC9), so some calls give up with QueueConnectionError (the worker logs them failed and goes on);
  what was sent meanwhile arrives late when the blackhole ends, unless the next fault resets it;
* ``delay``: 50-400 ms of latency each way (from about 200 ms, calls give up: see DELAY_SECONDS);
* ``slow``: 2-64 KB/s per direction.

The promise judged (rpc, stress/checker.py): nothing acked lost, nothing delivered twice, per-producer
order, no call past its timeout + 2 s (+ the checker's slack): exactly-once under retransmission
(RPC10, RPC17); a put that failed is indeterminate, a get that failed took nothing (E16, RPC9).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Optional

from stress.runner import FaultContext, Scenario, Service, Target

from ..proxy import Proxy
from . import scenario

BLACKHOLE_SECONDS = (0.2, 3.5)
"""A blackhole's length: up to past a timed call's grace (0.5 s timeout + 2 s), so that some calls give up."""
DELAY_SECONDS = (0.05, 0.4)
"""One-way latency of ``delay`` mode. Up to 0.4 s, a round trip near the client's 0.5 s resend: retransmissions
on the same socket, never a reconnect storm (RPC9; tests/rpc/test_rpc_faults.py checks 300 ms one-way)."""
SLOW_RATE = (2_000, 64_000)
"""Bytes per second per direction in ``slow`` mode."""
FAULT_SECONDS = (0.3, 1.5)
"""How long a delay, slow or reset mode lasts."""
PASS_SECONDS = (0.2, 0.8)
"""Healthy time between two faults."""
RETRY_TIMEOUT = 5.0
"""The descriptors' ``retry_timeout``: an untimed call (the harness's own qsize, destroy) gives up after this."""
MODES = ("reset", "blackhole", "delay", "slow")


@scenario
class CutConnections(Scenario):
    name = "cut-connections"
    description = "rpc through a proxy that resets, blackholes, delays and throttles the connections (seeded)"
    faults = 6
    soak_faults = 400
    modes = ("descriptor",)
    types = ("rpc",)
    blackhole_seconds = BLACKHOLE_SECONDS
    """Range of a blackhole's length (an instance may narrow it: below 2 s, no timed call gives up)."""
    fault_modes = MODES
    """The proxy modes drawn from (an instance may narrow them)."""
    delay_seconds = DELAY_SECONDS
    """Range of the one-way latency of ``delay`` mode (an instance may narrow it: see DELAY_SECONDS)."""

    def applies_to(self, target: Target) -> bool:
        # A network backend: its queues live on a server it can start (local_service: rpc), which a proxy
        # can stand in front of.
        from sage_queue.registry import QUEUE_STUB_MAPPING, backend_class

        if target.mode != "descriptor" or target.service is None or target.name not in QUEUE_STUB_MAPPING:
            return False
        return getattr(backend_class(target.name), "local_service", None) is not None

    def setup(self, target: Target, stack: ExitStack) -> Optional[Service]:
        assert target.service is not None
        metadata = dict(stack.enter_context(target.service()))
        if "host" not in metadata or "port" not in metadata:
            raise ValueError(f"cut-connections needs a service with a host and a port; {target.name} gave {metadata}")
        proxy = Proxy((metadata["host"], metadata["port"])).start()
        stack.callback(proxy.stop)
        upstream = (metadata["host"], metadata["port"])
        metadata.update(host=proxy.address[0], port=proxy.address[1], retry_timeout=RETRY_TIMEOUT)
        return Service(metadata, {"proxy": proxy, "upstream": upstream})

    def inject(self, ctx: FaultContext) -> None:
        proxy: Proxy = ctx.service.control["proxy"]
        ctx.wait_ready(ctx.workers())
        try:
            while ctx.faults_done < ctx.faults:
                ctx.sleep(ctx.rng.uniform(*PASS_SECONDS))
                mode = ctx.rng.choice(self.fault_modes)
                if mode == "blackhole":
                    seconds = ctx.rng.uniform(*self.blackhole_seconds)
                    proxy.set_mode("blackhole")
                    what = f"blackhole {seconds:.1f} s"
                elif mode == "delay":
                    seconds = ctx.rng.uniform(*FAULT_SECONDS)
                    delay = ctx.rng.uniform(*self.delay_seconds)
                    proxy.set_mode("delay", delay=delay)
                    what = f"delay {delay * 1e3:.0f} ms for {seconds:.1f} s"
                elif mode == "slow":
                    seconds = ctx.rng.uniform(*FAULT_SECONDS)
                    rate = ctx.rng.randint(*SLOW_RATE)
                    proxy.set_mode("slow", rate=rate)
                    what = f"slow {rate / 1e3:.0f} KB/s for {seconds:.1f} s"
                else:
                    seconds = ctx.rng.uniform(0.05, 0.3)
                    proxy.set_mode("reset")
                    what = f"reset for {seconds:.2f} s"
                ctx.count_fault(what)
                ctx.sleep(seconds)
                proxy.set_mode("pass")
        finally:
            proxy.set_mode("pass")  # the drain and the teardown go through it too
