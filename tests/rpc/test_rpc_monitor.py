"""``sage_queue.monitor`` on rpc queues: sampled on a real server, never created by looking, a dead server shown."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from conftest import RpcFactory

from sage_queue import QueueDescriptor, QueueNotFound, monitor, resolve_descriptor
from sage_queue.monitor import GONE, OK, Sampler, Source, sample_queue

pytestmark = pytest.mark.timeout(90)


def test_an_rpc_queue_is_sampled_and_a_missing_one_is_not_created(rpc: RpcFactory) -> None:
    q = rpc(maxsize=10)
    q.put_many([1, 2, 3])
    q.get()
    sampler = Sampler()
    sampler.sample([Source("j", "q", q.descriptor.to_json())])
    q.put(4)
    [sample] = sampler.sample([Source("j", "q", q.descriptor.to_json())])
    assert sample.state == OK and sample.stats is not None
    assert (sample.stats.puts, sample.stats.gets, sample.stats.depth) == (4, 1, 3)
    assert sample.puts_per_s is not None and sample.puts_per_s > 0 and sample.stalled is True

    missing = rpc.describe(name=f"mon_missing_{uuid.uuid4().hex[:8]}")
    assert sample_queue(Source(None, "m", missing.to_json())).state == GONE
    attach = {**missing.to_dict(), "metadata": {**missing.to_dict()["metadata"], "create": False}}
    with pytest.raises(QueueNotFound):  # looking created nothing on the server
        resolve_descriptor(attach)


def test_a_dead_server_is_reported_within_the_sample_timeout(rpc_key_file: str) -> None:
    with socket.socket() as s:  # a port nobody listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    desc = QueueDescriptor.create("rpc", "nobody", host="127.0.0.1", port=port, key_file=rpc_key_file)
    patched, _ = monitor._attach_only(desc)
    assert patched is not None
    assert patched.metadata["create"] is False
    assert patched.metadata["connect_timeout"] == patched.metadata["retry_timeout"] == monitor.SAMPLE_TIMEOUT_S
    start = time.monotonic()
    sample = sample_queue(Source(None, "nobody", desc.to_json()))
    took = time.monotonic() - start
    assert sample.state in (GONE, monitor.ERROR) and sample.detail
    assert "did not answer within 2 s" in sample.detail  # the sample's timeout, not the rpc default of 10 s
    assert took < 9.0  # 2 s expected; the rpc defaults (10 s to connect) would exceed this
