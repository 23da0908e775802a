/*
 * claim.pml -- Promela model of the sage ring's claim / confirm / commit / abandon
 * protocol on the tail cursor (sagering.c: try_put_claim, confirm, sr_put_commit_one,
 * reap + abandon_put), checked with spin:
 *
 *     spin -a claim.pml && gcc -O2 -DSAFETY -o pan pan.c && ./pan -m100000   (safety)
 *     spin -a claim.pml && gcc -O2 -DNP -o pan pan.c && ./pan -l -f -m200000 (liveness)
 *
 * (tests/test_sage_model.py runs both when spin is installed.)
 * Each `atomic { }` is one machine-level atomic step of the C code (a CAS, a store,
 * a load); between them every interleaving is explored, and a producer may die
 * (SIGKILL) between any two of its steps.  Positions are unit counts, records are 1 or 2
 * units long, the ring is big enough not to wrap (wrap-around is exercised by the C and
 * process tests; it does not change the claim logic).
 *
 * Checked:
 *   - every unit of every successful claim ends up exactly once either COMMITTED by its
 *     live owner or ABANDONED by one survivor (never both, never neither once the
 *     consumer has passed it);
 *   - the consumer never returns a record that was not committed, and returns every
 *     committed record once, in position order (`got` only grows);
 *   - the consumer never gets stuck: it ends having passed every claimed unit,
 *     whatever producers died where (no invalid end state), and under weak fairness
 *     it has no cycle that never advances the head (label progress_head);
 *   - when the consumer finds no CLAIMED entry covering a stuck head, the head record
 *     is published: the confirm discipline records every successful claim before the
 *     cursor forgets it (the assertion after the entry scan).
 *
 * What the model showed: its first version took over a dead claim and wrote ABANDONED
 * at the head without looking again, and spin found the interleaving where the owner
 * publishes its record between the survivor's look at the head and its own death.
 * abandon_put() in the C code re-reads the record (record_published()) for that reason;
 * the model now does the same.
 */

#define NPROD 2
#define MAXPOS 6

/* record states at a position (ring memory) */
#define EMPTY 0
#define COMMITTED 1
#define ABANDONED 3

/* claim entry phases */
#define IDLE 0
#define ANNOUNCED 1
#define CLAIMED 2
#define TAKEN 3   /* ABANDONED phase: a survivor owns the claim */

byte tpos = 0;          /* tail cursor: position ... */
byte tidx = 0;          /* ... and the entry (producer + 1) of the last claim; 0 = none */
byte rec[MAXPOS];       /* state word per position (only record starts are used) */
byte rlen[MAXPOS];      /* info word: record length */
byte eseq[NPROD];       /* claim entries (one per producer) */
byte ephase[NPROD];
byte epos[NPROD];
byte elen[NPROD];
bool dead[NPROD];
byte claimed_units = 0; /* units successfully claimed (for the final check) */
byte committed[MAXPOS];  /* ghost: who committed / abandoned each record start */
byte abandoned_at[MAXPOS];
byte hpos = 0;          /* consumer's head */
bool producers_done[NPROD];

/* confirm(idx, cursor_pos): the claim that produced the cursor is recorded as CLAIMED */
inline confirm(i, cpos) {
    if
    :: i != 0 ->
        atomic {
            if
            :: ephase[i-1] == ANNOUNCED && epos[i-1] + elen[i-1] == cpos -> ephase[i-1] = CLAIMED
            :: else -> skip
            fi
        }
    :: else -> skip
    fi
}

proctype producer(byte me; byte ln) {
    byte p, prev;
    /* may die before doing anything */
    if :: dead[me] = true; goto out :: skip fi;
retry:
    atomic { p = tpos; prev = tidx };                      /* snap_cursor(T) */
    if :: p + ln > MAXPOS -> goto out :: else -> skip fi;  /* full: give up (not modelled) */
    atomic { eseq[me]++; ephase[me] = ANNOUNCED; epos[me] = p; elen[me] = ln };  /* announce() */
    if :: dead[me] = true; goto out :: skip fi;
    confirm(prev, p);
    if :: dead[me] = true; goto out :: skip fi;
    atomic {                                               /* cas128(T) */
        if
        :: tpos == p && tidx == prev -> tpos = p + ln; tidx = me + 1; claimed_units = claimed_units + ln
        :: else -> goto retry
        fi
    };
    if :: dead[me] = true; goto out :: skip fi;
    atomic { if :: ephase[me] == ANNOUNCED -> ephase[me] = CLAIMED :: else -> skip fi };  /* confirm_own() */
    if :: dead[me] = true; goto out :: skip fi;
    atomic {                                               /* commit: info, then state (release) */
        assert(rec[p] == EMPTY);
        rlen[p] = ln; rec[p] = COMMITTED; committed[p]++
    };
    if :: dead[me] = true; goto out :: skip fi;
    ephase[me] = IDLE;                                     /* finish_entry() */
out:
    producers_done[me] = true
}

proctype consumer() {
    byte s, j, l, ti, tp;
    bool found;
    do
    :: (rec[hpos] == COMMITTED || rec[hpos] == ABANDONED) ->
        atomic { s = rec[hpos]; l = rlen[hpos] };
        assert(l > 0);
progress_head:
        hpos = hpos + l                                    /* claim H (single consumer) */
    :: (rec[hpos] == EMPTY && tpos > hpos) ->     /* stuck behind a claim: reap */
        atomic { tp = tpos; ti = tidx };
        confirm(ti, tp);
        found = false;
        j = 0;
        do
        :: j < NPROD ->
            if
            :: (ephase[j] == CLAIMED && epos[j] <= hpos && hpos < epos[j] + elen[j]) ->
                found = true;
                if
                :: dead[j] ->
                    atomic {                               /* CAS CLAIMED -> TAKEN, then own it */
                        if
                        :: ephase[j] == CLAIMED -> ephase[j] = TAKEN
                        :: else -> goto next_entry
                        fi
                    };
                    /* abandon_put(): the owner may have published its record between our
                     * look at the head and its death; only an unpublished record is ours */
                    atomic {
                        if
                        :: rec[epos[j]] == EMPTY ->
                           rlen[epos[j]] = elen[j]; rec[epos[j]] = ABANDONED;
                           abandoned_at[epos[j]]++
                        :: else -> skip
                        fi
                    }
                :: else -> skip                            /* alive: wait for its commit */
                fi
            :: else -> skip
            fi;
next_entry:
            j++
        :: else -> break
        od;
        /* nothing claims hpos: then its record must be published, or a live producer
         * is between its CAS and its commit (found above), never a dead one */
        if
        :: !found -> assert(rec[hpos] != EMPTY || tpos <= hpos)
        :: else -> skip
        fi
    :: (producers_done[0] && producers_done[1] && tpos == hpos) -> break
    od;
    /* every claimed unit was passed; each record start committed xor abandoned, once */
    j = 0;
    do
    :: j < MAXPOS -> assert(committed[j] + abandoned_at[j] <= 1); j++
    :: else -> break
    od;
    assert(hpos == claimed_units)
}

init {
    atomic {
        run producer(0, 1);
        run producer(1, 2);
        run consumer()
    }
}
