"""``sage_queue.monitor`` on Ray queues: sampled by name, never created by looking, gone once destroyed."""

from __future__ import annotations

import uuid

import pytest
import ray

from sage_queue import QueueDescriptor, resolve_descriptor
from sage_queue.backends import _ray
from sage_queue.monitor import GONE, OK, Sampler, Source, render_openmetrics, sample_queue

pytestmark = pytest.mark.timeout(120)


def _actor_exists(desc: QueueDescriptor) -> bool:
    md = dict(desc.metadata)
    try:
        ray.get_actor(_ray.full_name(desc.queue_type, md), namespace=_ray.namespace_of(md))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("queue_type", ["ray_actor", "ray_queue"])
def test_a_ray_queue_is_sampled_and_never_created_by_looking(ray_address: str, queue_type: str) -> None:
    missing = QueueDescriptor.create(queue_type, f"mon-missing-{uuid.uuid4().hex[:8]}")
    sample = sample_queue(Source(None, "missing", missing.to_json()))
    assert sample.state == GONE, sample
    assert not _actor_exists(missing)  # looking created no actor

    q = resolve_descriptor(QueueDescriptor.create(queue_type, f"mon-{uuid.uuid4().hex[:8]}"))
    try:
        q.put("a")
        q.put("b")
        sampler = Sampler()
        [first] = sampler.sample([Source("j", "q", q.descriptor.to_json())])
        assert first.state in (OK, "no stats"), first
        if first.state == OK:
            assert first.stats is not None and first.stats.depth == 2
            text = render_openmetrics([first])
            assert 'sage_queue_depth{job="j",queue="q",type="' + queue_type + '"} 2' in text
    finally:
        q.destroy()
    [after] = sampler.sample([Source("j", "q", q.descriptor.to_json())])
    assert after.state == GONE, after
    assert not _actor_exists(q.descriptor)
