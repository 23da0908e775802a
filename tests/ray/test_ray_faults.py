"""kill-actor through the fault harness: ``ray.kill`` of a queue's actor under load, on the session's Ray.

The workers are forkserver processes that join this session's cluster through the descriptor's
``address`` (the scenario's setup puts it there); every run is judged by the one checker against
the type's promise (stress/checker.py: RAY9, RAY10, RAY14). The session's leak guard
(conftest.py) fails the run if a ``sageq:`` actor is left alive: every run destroys its queue.
"""

from __future__ import annotations

import pytest
import ray
from ray_support import leaked_actors

from fault_injection.scenarios import get_scenario
from fault_injection.scenarios.kill_actor import KillActor
from stress.runner import FaultContext, run, target_for


def _no_actor_of(prefix: str) -> bool:
    return not [a for a in leaked_actors() if prefix in a]


@pytest.mark.spec("RAY14", "RAY10")
@pytest.mark.timeout(120)
def test_kill_actor_on_ray_actor_loses_only_what_the_actor_held(ray_address: str) -> None:
    assert ray.is_initialized()
    result = run(target_for("ray_actor", prefix="tkillact"), scenario=get_scenario("kill-actor"), faults=2, seed=5)
    assert result.ok, result.summary()
    report = result.report
    assert report is not None and result.faults == 2 and report.queue_kills == 2
    # The run went on on the restarted actor: items were got after the kills, and the kills were felt.
    assert report.got > 0 and report.failed > 0
    assert report.duplicated == report.unexpected == report.out_of_order == report.overruns == 0
    assert report.lost <= report.lost_at_kill
    assert _no_actor_of("tkillact")


@pytest.mark.spec("RAY14", "RAY9")
@pytest.mark.timeout(120)
def test_kill_actor_on_ray_queue_ends_the_run_with_the_queue(ray_address: str) -> None:
    result = run(target_for("ray_queue", prefix="tkillq"), scenario=get_scenario("kill-actor"), faults=3, seed=5)
    assert result.ok, result.summary()
    report = result.report
    # One kill ends the queue: the workers' calls then failed at once (no hang, no overrun), and the run
    # ended without a drain.
    assert report is not None and result.faults == 1 and report.queue_kills == 1
    assert report.failed > 0 and report.overruns == report.stuck == 0
    assert any("not drained" in n for n in report.notes), report.notes
    assert report.lost == report.lost_at_kill
    assert _no_actor_of("tkillq")


@pytest.mark.spec("RAY14")
@pytest.mark.timeout(120)
def test_kill_actor_can_fail_a_kill_the_scenario_does_not_record_breaks_the_promise(ray_address: str) -> None:
    # The same kills, not recorded with queue_lost: the checker must then call the items that died
    # with the actor lost beyond the bound (the verdict of the scenario can fail).
    class Unrecorded(KillActor):
        name = "kill-actor-unrecorded"
        restarts = False

        def inject(self, ctx: FaultContext) -> None:
            ctx.queue_lost = lambda dead_by, what="", count=True: ctx.count_fault(what)  # type: ignore[method-assign]
            super().inject(ctx)

    scenario = Unrecorded()
    # Two producers, one consumer: a backlog sits in the actor when it is killed.
    result = run(
        target_for("ray_actor", prefix="tkillu"), scenario=scenario, faults=1, seed=5, producers=2, consumers=1
    )
    assert not result.ok
    assert result.report is not None and result.report.lost > 0, result.summary()
    assert any("acked items lost" in p for p in result.problems), result.problems


@pytest.mark.spec("RAY14")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", ["kill-any", "stop-resume"])
@pytest.mark.parametrize("queue_type", ["ray_actor", "ray_queue"])
def test_worker_scenarios_keep_rays_promise(ray_address: str, queue_type: str, scenario: str) -> None:
    # The worker scenarios of tests/test_faults_harness.py, here because Ray runs here (short counts:
    # a Ray call costs milliseconds on this machine). A worker killed inside get may lose its call's items.
    result = run(target_for(queue_type, prefix="tworker"), scenario=get_scenario(scenario), faults=3, seed=9)
    assert result.ok, result.summary()
    report = result.report
    assert report is not None and report.got > 0 and report.duplicated == report.out_of_order == 0
    assert result.kills == 3 if scenario == "kill-any" else result.stops == 3
    assert _no_actor_of("tworker")
