"""Exhaustive interleavings of the sage ring's claim/confirm/commit/abandon protocol.

The same model as ``sage_queue/_core/model/claim.pml`` (see its header for the mapping
to ``sagering.c``), explored by a small explicit-state search in Python so that it runs
everywhere, with or without ``spin``: two producers (records of 1 and 2 units, two puts
each) that may die between any two of their atomic steps, and a consumer that reaps dead claims. Every
reachable state is visited; in each one the protocol's invariants are checked, and from
each state where every producer has finished or died, the consumer alone must reach the
end having passed every claimed unit.

A second model covers the consumer side: two readers claiming records at the head
cursor, publishing CONSUMED and sweeping the free cursor, any of them killed between
any two steps, and a blocked producer that reaps (takes over dead readers' claims and a
dead sweeper's cursor, and sweeps). No record is returned twice, the free cursor never
passes the head, and every record read is eventually given back.

A third model covers a batch's progress as a reaper reads it (issue 9): the reaper must
abandon from the progress it reads after winning the claim, not from its first look.

Each model has a mutation test: remove the safeguard the model was written to justify
and the search must find the failure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import pytest

EMPTY, COMMITTED, ABANDONED = 0, 1, 3
IDLE, ANNOUNCED, CLAIMED, TAKEN = 0, 1, 2, 3
DONE = 99
PUTS = 2  # puts per producer: the second reuses the claim entry (stale announces, re-confirm)
MAXPOS = 2 * (1 + 2)


@dataclass(frozen=True)
class S:
    tpos: int = 0
    tidx: int = 0  # entry (producer + 1) of the last claim, 0 = none
    rec: tuple[int, ...] = (EMPTY,) * MAXPOS
    rlen: tuple[int, ...] = (0,) * MAXPOS
    eph: tuple[int, int] = (IDLE, IDLE)
    epos: tuple[int, int] = (0, 0)
    elen: tuple[int, int] = (0, 0)
    dead: tuple[bool, bool] = (False, False)
    claimed: int = 0
    committed: tuple[int, ...] = (0,) * MAXPOS
    abandoned: tuple[int, ...] = (0,) * MAXPOS
    # producers' program state: pc, p, prev
    ppc: tuple[int, int] = (0, 0)
    pp: tuple[int, int] = (0, 0)
    pprev: tuple[int, int] = (0, 0)
    puts_left: tuple[int, int] = (PUTS, PUTS)
    # consumer: pc, head, scan index, found, tp, ti
    cpc: int = 0
    hpos: int = 0
    cj: int = 0
    found: bool = False
    ctp: int = 0
    cti: int = 0


LENS = (1, 2)


def _set(t: tuple, i: int, v: object) -> tuple:
    return (*t[:i], v, *t[i + 1 :])


def _confirm(s: S, idx: int, cpos: int) -> S:
    if idx and s.eph[idx - 1] == ANNOUNCED and s.epos[idx - 1] + s.elen[idx - 1] == cpos:
        return replace(s, eph=_set(s.eph, idx - 1, CLAIMED))
    return s


def producer_moves(s: S, me: int) -> list[S]:
    pc = s.ppc[me]
    if pc == DONE:
        return []
    out = []
    if pc >= 1 or pc == 0:  # SIGKILL between any two steps (and before the first)
        out.append(replace(s, dead=_set(s.dead, me, True), ppc=_set(s.ppc, me, DONE)))
    ln = LENS[me]
    p, prev = s.pp[me], s.pprev[me]
    if pc == 0:  # snap_cursor(T)
        if s.tpos + ln > MAXPOS:
            out.append(replace(s, ppc=_set(s.ppc, me, DONE)))
        else:
            out.append(replace(s, pp=_set(s.pp, me, s.tpos), pprev=_set(s.pprev, me, s.tidx), ppc=_set(s.ppc, me, 1)))
    elif pc == 1:  # announce()
        out.append(
            replace(
                s,
                eph=_set(s.eph, me, ANNOUNCED),
                epos=_set(s.epos, me, p),
                elen=_set(s.elen, me, ln),
                ppc=_set(s.ppc, me, 2),
            )
        )
    elif pc == 2:  # confirm(prev)
        out.append(replace(_confirm(s, prev, p), ppc=_set(s.ppc, me, 3)))
    elif pc == 3:  # cas128(T)
        if s.tpos == p and s.tidx == prev:
            out.append(replace(s, tpos=p + ln, tidx=me + 1, claimed=s.claimed + ln, ppc=_set(s.ppc, me, 4)))
        else:
            out.append(replace(s, ppc=_set(s.ppc, me, 0)))
    elif pc == 4:  # confirm_own()
        t = replace(s, eph=_set(s.eph, me, CLAIMED)) if s.eph[me] == ANNOUNCED else s
        out.append(replace(t, ppc=_set(s.ppc, me, 5)))
    elif pc == 5:  # commit: info, then the state word
        assert s.rec[p] == EMPTY, f"producer {me} commits over a non-empty record: {s}"
        out.append(
            replace(
                s,
                rlen=_set(s.rlen, p, ln),
                rec=_set(s.rec, p, COMMITTED),
                committed=_set(s.committed, p, s.committed[p] + 1),
                ppc=_set(s.ppc, me, 6),
            )
        )
    elif pc == 6:  # finish_entry(), then the next put or the end
        left = s.puts_left[me] - 1
        out.append(
            replace(
                s,
                eph=_set(s.eph, me, IDLE),
                ppc=_set(s.ppc, me, 0 if left else DONE),
                puts_left=_set(s.puts_left, me, left),
            )
        )
    return out


def consumer_moves(s: S) -> list[S]:
    pc, h = s.cpc, s.hpos
    if pc == DONE:
        return []
    if pc == 0:
        if h < MAXPOS and s.rec[h] in (COMMITTED, ABANDONED):
            assert s.rlen[h] > 0
            return [replace(s, hpos=h + s.rlen[h])]
        if h < MAXPOS and s.rec[h] == EMPTY and s.tpos > h:
            return [replace(s, cpc=1, ctp=s.tpos, cti=s.tidx)]  # stuck: reap
        if all(pc_ == DONE for pc_ in s.ppc) and s.tpos == h:
            return [replace(s, cpc=DONE)]
        return []  # waits
    if pc == 1:  # confirm the entry named by T
        return [replace(_confirm(s, s.cti, s.ctp), cpc=2, cj=0, found=False)]
    if pc == 2:  # scan entry cj
        j = s.cj
        if j == 2:
            assert s.found or s.rec[h] != EMPTY or s.tpos <= h, f"stuck head with no recorded claimer: {s}"
            return [replace(s, cpc=0)]
        covers = s.eph[j] == CLAIMED and s.epos[j] <= h < s.epos[j] + s.elen[j]
        if not covers:
            return [replace(s, cj=j + 1)]
        t = replace(s, found=True)
        if not s.dead[j]:
            return [replace(t, cj=j + 1)]
        if s.eph[j] != CLAIMED:  # the takeover CAS fails
            return [replace(t, cj=j + 1)]
        return [replace(t, eph=_set(s.eph, j, TAKEN), cpc=3)]
    if pc == 3:  # abandon_put(): re-read the record, abandon only what is unpublished
        j = s.cj
        start = s.epos[j]
        if s.rec[start] == EMPTY:
            t = replace(
                s,
                rlen=_set(s.rlen, start, s.elen[j]),
                rec=_set(s.rec, start, ABANDONED),
                abandoned=_set(s.abandoned, start, s.abandoned[start] + 1),
            )
        else:
            t = s
        return [replace(t, cpc=2, cj=j + 1)]
    raise AssertionError(pc)


def _check(s: S) -> None:
    for i in range(MAXPOS):
        assert s.committed[i] + s.abandoned[i] <= 1, f"record {i} both committed and abandoned: {s}"
    if s.cpc == DONE:
        assert s.hpos == s.claimed, f"consumer finished without passing every claim: {s}"


def _consumer_alone_finishes(s: S) -> bool:
    seen = set()
    while s.cpc != DONE:
        if s in seen:
            return False
        seen.add(s)
        nxt = consumer_moves(s)
        if not nxt:
            return False
        s = nxt[0]
        _check(s)
    return True


def explore(limit: Optional[int] = None) -> int:
    start = S()
    seen = {start}
    stack = [start]
    while stack:
        s = stack.pop()
        _check(s)
        succ = producer_moves(s, 0) + producer_moves(s, 1) + consumer_moves(s)
        if not succ:
            assert s.cpc == DONE and all(pc == DONE for pc in s.ppc), f"deadlock: {s}"
        if all(pc == DONE for pc in s.ppc):
            assert _consumer_alone_finishes(s), f"consumer cannot finish after every producer ended: {s}"
        for t in succ:
            if t not in seen:
                seen.add(t)
                stack.append(t)
        if limit and len(seen) > limit:
            break
    return len(seen)


@pytest.mark.spec("SAGE10", "SAGE11")
@pytest.mark.timeout(300)
def test_every_interleaving_with_deaths() -> None:
    states = explore()
    assert states > 1000  # the search really branched (deaths, CAS failures, reaps)


@pytest.mark.spec("SAGE10")
def test_the_model_catches_a_missing_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mutation check: without abandon_put()'s re-read the search must find the interleaving
    # where a survivor abandons a record its owner published just before dying.
    def abandon_blindly(s: S) -> list[S]:
        if s.cpc != 3:
            return original(s)
        j = s.cj
        start = s.epos[j]
        t = replace(
            s,
            rlen=_set(s.rlen, start, s.elen[j]),
            rec=_set(s.rec, start, ABANDONED),
            abandoned=_set(s.abandoned, start, s.abandoned[start] + 1),
        )
        return [replace(t, cpc=2, cj=j + 1)]

    original = consumer_moves
    monkeypatch.setattr(__import__(__name__), "consumer_moves", abandon_blindly)
    with pytest.raises(AssertionError, match="both committed and abandoned"):
        explore()


# -- the consumer side: head claims, the free cursor, dead readers and dead sweepers ---------

NREC = 3  # records of one unit each, all committed before the consumers start
READY, CONSUMED = 1, 4


@dataclass(frozen=True)
class G:
    hpos: int = 0
    hidx: int = 0
    fpos: int = 0
    fown: int = 0  # consumer + 1 holding F, 0 = free
    rec: tuple[int, ...] = (READY,) * NREC + (0,)
    eph: tuple[int, int] = (IDLE, IDLE)
    epos: tuple[int, int] = (0, 0)
    dead: tuple[bool, bool] = (False, False)
    returned: tuple[int, ...] = (0,) * NREC  # ghost: times each record was handed to a caller
    lost: int = 0  # ghost: records taken over from dead readers
    cpc: tuple[int, int] = (0, 0)
    cr: tuple[int, int] = (0, 0)  # the head position a consumer read
    cprev: tuple[int, int] = (0, 0)
    gets_left: tuple[int, int] = (2, 2)
    spc: int = 0  # the space waiter (a blocked producer that reaps)


def _gconfirm(s: G, idx: int, cpos: int) -> G:
    if idx and s.eph[idx - 1] == ANNOUNCED and s.epos[idx - 1] + 1 == cpos:
        return replace(s, eph=_set(s.eph, idx - 1, CLAIMED))
    return s


# consumer program counters
(C_SNAP, C_ANN, C_CONF, C_CAS, C_OWN, C_CLEAR, C_IDLE, C_SW_SNAP, C_SW_CAS, C_SW_CLEAR, C_SW_REL) = range(11)


def consumer_g_moves(s: G, me: int) -> list[G]:
    pc = s.cpc[me]
    if pc == DONE:
        return []
    out = [replace(s, dead=_set(s.dead, me, True), cpc=_set(s.cpc, me, DONE))]  # SIGKILL here
    r, prev = s.cr[me], s.cprev[me]

    def go(t: G, nxt: int) -> G:
        return replace(t, cpc=_set(t.cpc, me, nxt))

    if pc == C_SNAP:  # snap_cursor(H) and the state word at the head
        if s.gets_left[me] == 0 or s.hpos >= NREC or s.rec[s.hpos] != READY:
            out.append(go(s, C_SW_SNAP if s.gets_left[me] else DONE))
        else:
            out.append(go(replace(s, cr=_set(s.cr, me, s.hpos), cprev=_set(s.cprev, me, s.hidx)), C_ANN))
    elif pc == C_ANN:
        out.append(go(replace(s, eph=_set(s.eph, me, ANNOUNCED), epos=_set(s.epos, me, r)), C_CONF))
    elif pc == C_CONF:
        out.append(go(_gconfirm(s, prev, r), C_CAS))
    elif pc == C_CAS:
        if s.hpos == r and s.hidx == prev:
            out.append(go(replace(s, hpos=r + 1, hidx=me + 1), C_OWN))
        else:
            out.append(go(s, C_SNAP))
    elif pc == C_OWN:
        t = replace(s, eph=_set(s.eph, me, CLAIMED)) if s.eph[me] == ANNOUNCED else s
        out.append(go(replace(t, returned=_set(t.returned, r, t.returned[r] + 1)), C_CLEAR))  # copied out
    elif pc == C_CLEAR:  # payload cleared, then CONSUMED published
        assert s.rec[r] == READY, f"record {r} changed under its reader: {s}"
        out.append(go(replace(s, rec=_set(s.rec, r, CONSUMED)), C_IDLE))
    elif pc == C_IDLE:
        left = s.gets_left[me] - 1
        out.append(go(replace(s, eph=_set(s.eph, me, IDLE), gets_left=_set(s.gets_left, me, left)), C_SW_SNAP))
    elif pc == C_SW_SNAP:  # sweep(): F busy or the record at F not consumed -> leave
        nxt = C_SNAP if s.gets_left[me] else DONE
        if s.fown or s.fpos >= NREC or s.rec[s.fpos] != CONSUMED:
            out.append(go(s, nxt))
        else:
            out.append(go(replace(s, cr=_set(s.cr, me, s.fpos)), C_SW_CAS))
    elif pc == C_SW_CAS:
        if s.fpos == r and s.fown == 0:
            out.append(go(replace(s, fown=me + 1), C_SW_CLEAR))
        else:
            out.append(go(s, C_SW_SNAP))
    elif pc == C_SW_CLEAR:
        assert s.rec[r] == CONSUMED and s.fown == me + 1, f"sweeper clears what it does not own: {s}"
        out.append(go(replace(s, rec=_set(s.rec, r, 0)), C_SW_REL))
    elif pc == C_SW_REL:
        if s.fpos == r and s.fown == me + 1:
            out.append(go(replace(s, fpos=r + 1, fown=0), C_SW_SNAP))
        else:  # a survivor took F over and finished this record
            out.append(go(s, C_SW_SNAP))
    return out


def waiter_moves(s: G) -> list[G]:
    """A producer blocked on space: once stalled, it reaps dead readers and dead sweepers."""
    if s.spc == DONE:
        return []
    f = s.fpos
    if f >= NREC or (f == s.hpos and all(pc == DONE for pc in s.cpc)):
        return [replace(s, spc=DONE)]  # everything read has been given back
    if s.fown and s.dead[s.fown - 1]:  # F held by a dead sweeper: take it over and finish
        assert s.rec[f] in (CONSUMED, 0)
        return [replace(s, rec=_set(s.rec, f, 0), fpos=f + 1, fown=0)]
    if s.fown == 0 and s.rec[f] == CONSUMED:  # sweep it ourselves
        return [replace(s, rec=_set(s.rec, f, 0), fpos=f + 1)]
    t = _gconfirm(s, s.hidx, s.hpos)
    for j in (0, 1):
        if t.eph[j] == CLAIMED and t.epos[j] == f and t.dead[j] and t.fown == 0:
            # take the dead reader's claim over (CAS CLAIMED -> TAKEN), finish its record
            u = replace(t, eph=_set(t.eph, j, TAKEN))
            if u.rec[f] == READY:
                u = replace(u, rec=_set(u.rec, f, CONSUMED), lost=u.lost + 1)
            return [u]
    return [t] if t != s else []


def explore_consumers() -> int:
    start = G()
    seen = {start}
    stack = [start]
    while stack:
        s = stack.pop()
        assert all(n <= 1 for n in s.returned), f"a record was returned twice: {s}"
        assert s.fpos <= s.hpos, f"the free cursor passed the head: {s}"
        succ = consumer_g_moves(s, 0) + consumer_g_moves(s, 1) + waiter_moves(s)
        if not succ:
            assert all(pc == DONE for pc in s.cpc) and s.spc == DONE, f"deadlock: {s}"
            reclaimed = s.fpos
            assert reclaimed == s.hpos, f"space of consumed records never came back: {s}"
            assert s.lost <= sum(s.dead), s
        for t in succ:
            if t not in seen:
                seen.add(t)
                stack.append(t)
    return len(seen)


@pytest.mark.spec("SAGE10", "SAGE11")
@pytest.mark.timeout(300)
def test_every_interleaving_of_readers_and_sweepers_with_deaths() -> None:
    assert explore_consumers() > 1000


@pytest.mark.spec("SAGE10")
def test_the_consumer_model_needs_the_blocked_producer_to_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mutation check: a reader killed between publishing CONSUMED and sweeping leaves the
    # free cursor behind a record nobody names; without reap()'s sweep the search finds
    # producers blocked forever.
    original = waiter_moves

    def never_sweeps(s: G) -> list[G]:
        if s.spc != DONE and s.fpos < NREC and s.fown == 0 and s.rec[s.fpos] == CONSUMED:
            t = _gconfirm(s, s.hidx, s.hpos)
            return [t] if t != s else []
        return original(s)

    monkeypatch.setattr(__import__(__name__), "waiter_moves", never_sweeps)
    with pytest.raises(AssertionError, match="deadlock"):
        explore_consumers()


# -- the reaper's read of a batch's progress (issue 9) ------------------------------------
#
# One producer puts a batch of BATCH records in one claim: for each record j it stores
# progress = j (sr_put_commit_one(), before the commit), then commits record j; after the
# last one it finishes its entry (CLAIMED -> IDLE). It may die between any two steps. A
# reaper (reap() + abandon_put()) looks at the entry (reads progress), checks the owner for
# death, takes the claim over by CAS (CLAIMED -> TAKEN), then abandons from record j (or
# j + 1 if record j went out) to the end. The old reaper abandoned with the progress of
# its first look: the producer could publish more records and die in between, and the
# ABANDONED marker landed on published records. The fix re-reads progress after the CAS.

BATCH = 3
PUBLISHED, LOST = 1, 2


@dataclass(frozen=True)
class B:
    recs: tuple[int, ...] = (EMPTY,) * BATCH
    progress: int = 0
    phase: int = CLAIMED
    dead: bool = False
    ppc: int = 0  # producer: 2*j = store progress j, 2*j+1 = commit j, 2*BATCH = finish
    rpc: int = 0  # reaper: 0 look, 1 liveness check + CAS, 2 abandon, DONE
    seen: int = 0  # the progress the reaper read at its look


def batch_moves(s: B, reread: bool) -> list[B]:
    out = []
    if s.ppc != DONE:
        out.append(replace(s, dead=True, ppc=DONE))  # SIGKILL between any two steps
        if s.ppc == 2 * BATCH:
            out.append(replace(s, phase=IDLE, ppc=DONE))
        elif s.ppc % 2 == 0:
            out.append(replace(s, progress=s.ppc // 2, ppc=s.ppc + 1))
        else:
            j = s.ppc // 2
            assert s.recs[j] == EMPTY, f"the producer commits over an abandoned record: {s}"
            out.append(replace(s, recs=_set(s.recs, j, PUBLISHED), ppc=s.ppc + 1))
    if s.rpc == 0 and s.phase == CLAIMED:
        out.append(replace(s, seen=s.progress, rpc=1))
    elif s.rpc == 1:
        if not s.dead:
            out.append(replace(s, rpc=0))  # alive: look again later
        elif s.phase == CLAIMED:
            out.append(replace(s, phase=TAKEN, rpc=2))
        else:
            out.append(replace(s, rpc=DONE))
    elif s.rpc == 2:
        j = s.progress if reread else s.seen
        start = j + 1 if s.recs[j] == PUBLISHED else j
        recs = s.recs
        for k in range(start, BATCH):
            assert recs[k] != PUBLISHED, f"abandoned over published record {k}: {s}"
            recs = _set(recs, k, LOST)
        out.append(replace(s, recs=recs, rpc=DONE))
    return out


def explore_batch(reread: bool) -> int:
    start = B()
    seen = {start}
    stack = [start]
    while stack:
        s = stack.pop()
        if s.ppc == DONE and not s.dead:
            assert all(r == PUBLISHED for r in s.recs), f"a finished batch lost records: {s}"
        if s.phase == TAKEN and s.rpc == DONE:
            assert EMPTY not in s.recs, f"records neither delivered nor counted lost: {s}"
        succ = batch_moves(s, reread)
        if not succ:  # the end: the producer done or dead, the reaper idle or finished
            assert s.ppc == DONE and (s.rpc == DONE or s.phase != CLAIMED), f"stuck: {s}"
        for t in succ:
            if t not in seen:
                seen.add(t)
                stack.append(t)
    return len(seen)


@pytest.mark.spec("SAGE11", "SAGE12")
def test_reaper_abandons_only_unpublished_records_of_a_batch() -> None:
    assert explore_batch(reread=True) > 50


@pytest.mark.spec("SAGE10")
def test_the_model_catches_a_stale_progress_read() -> None:
    # Mutation check: abandoning with the progress of the reaper's first look (the old
    # reap()) must be found to overwrite a record published after that look.
    with pytest.raises(AssertionError, match="abandoned over published record"):
        explore_batch(reread=False)
