"""Fault injection, generic over any cross-process queue descriptor.

:func:`run_faults` SIGKILLs random producer and consumer processes mid-put/get,
again and again, respawning replacements, then checks the ledgers: no deadlock, no
corrupt, duplicated or invented item, per-producer order, and loss bounded by the
number of consumer kills (``sage-queue faults``).
"""

from __future__ import annotations

from .core import FaultResult, run_faults

__all__ = ["FaultResult", "run_faults"]
