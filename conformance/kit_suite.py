"""The module ``pytest -p conformance --queue-factory M:A`` collects: the kit, fed by the option."""

from __future__ import annotations

from conformance.suite import QueueConformance


class TestQueueConformance(QueueConformance):
    """The whole kit against the target given on the command line."""
