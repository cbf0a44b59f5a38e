"""Prefetcher: speculative reads of the next layer's experts while the current layer computes (issue #20).

On a cold decode the disk idles while a layer's attention, routing and expert math run (2-3 ms of the
31-40 ms of a 397B layer). Layer L+1's router applied to the hidden state leaving layer L names most of
the experts L+1 will pick (recall 84-89% on trained tiny models, bench/recall.py "leaving"), so the model
hands that guess over as soon as layer L is done (`start`), and the records are read in the background
while layer L+1's attention runs. A batched decode step guesses the union of its rows' guesses. When
L+1's real routing arrives (`settle`), only the prefetched reads it needs are waited for; the
mispredicted rest is read on demand as before.

A layer-major prefill (runtime/prefill.py) guesses further ahead: once layer L's union is resident, layer
L+1's router on the state leaving L's token mixer names L+1's union (the whole layer, in expert-id order,
when the guess is nearly all of it), read while L's experts compute; L's records are kept.

The guarantees:
* a guess never displaces a record of the layer it guesses for (whatever is resident for L+1 may be a
  hit), nor a slot a read is still writing; wrong guesses are demoted to least recently used once the real
  routing is known, so they are the next slots reused;
* the demand path never hands out a slot a background read is still writing (`busy`), and waits for the
  reads of the records it uses before they are computed with; the optimistic path (a device-side slot
  table, no host round trip) drains every read first, since a kernel may look up any resident record;
* a failed background read leaves its slot marked empty (the demand read then reads it again and reports
  the error there, if the record is needed at all).

The cache's bookkeeping (place, demote, invalidate) only ever runs on the model's thread; only the reads
run on this class's threads (ExpertReader.read is safe from several threads at once).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np



def prefetch_wanted(mode: str) -> bool:
    """Whether speculative prefetch (and the reads ahead of a layer-major prefill) run. "auto" is off, by
    measurement: on an H200 (397B shapes, 8 layers, K=10, io direct, benchmarks/RESULTS.md) guesses of the
    recall a trained model's router gives (0.84) made cold decode 0.97x (0.88-0.97) as fast as without them,
    since every wrong guess is a read the disk also has to make; and on unified memory (Apple GPUs, CPU) the
    slots are a one-layer staging area and background reads compete with the model for the same cores.
    "on" runs them wherever asked."""
    return mode == "on"


class Prefetcher:
    """Background reads of guessed (layer, expert) records into the cache's slots, for one reader+cache."""

    def __init__(self, reader, cache, k: int, workers: int | None = None):
        self.reader = reader
        self.cache = cache
        # few reads at once (the disk's queue is kept busy by a handful; the pinned path splits each record
        # over the reader's pool), so that the less likely guesses are still queued, and dropped, when the
        # real routing comes
        self.pool = ThreadPoolExecutor(max_workers=workers or max(1, min(k, reader.threads) // 2),
                                       thread_name_prefix="flashmoe-prefetch")
        self._inflight: dict[int, tuple[int, int, Future]] = {}  # slot -> (layer, expert, its read)
        self._guess: dict[int, set[int]] = {}  # layer -> experts of the latest guess for it
        # per layer: experts the real routing asked for, of those how many were guessed (hits), how many of
        # the hits had finished reading before they were asked for (ready), records read on a guess
        self.needed: Counter = Counter()
        self.hits: Counter = Counter()
        self.ready: Counter = Counter()
        self.prefetched: Counter = Counter()
        self.dropped: Counter = Counter()  # guesses still queued when the real routing came

    def busy(self) -> set[int]:
        """Slots a background read is still writing (finished reads are settled first)."""
        self._reap()
        return set(self._inflight)

    def _reap(self) -> None:
        """Forget finished reads; a failed one leaves its slot marked empty."""
        for s, (_, _, fu) in list(self._inflight.items()):
            if fu.done():
                del self._inflight[s]
                if fu.exception() is not None:
                    self.cache.invalidate([s])

    def start(self, layer: int, experts, keep=frozenset()) -> None:
        """Read the guessed `experts` of `layer` (most likely first) in the background: those not resident,
        into slots that hold no record of `layer`, that no read is writing and that `keep` does not name
        (records the layer being computed needs). A guess of at least the reader's sequential fraction of
        the layer is read as one job, in expert-id order (large sequential reads); a smaller one record by
        record, so that the less likely records are still queued, and dropped, when the real routing comes."""
        guess = list(dict.fromkeys(int(e) for e in np.asarray(experts).reshape(-1)))
        self._guess[layer] = set(guess)
        avoid = self.busy() | self.cache.resident_slots(layer) | set(keep)
        _, to_read, slots = self.cache.place(layer, guess, avoid=avoid)
        if len(to_read) > 1 and len(to_read) >= self.reader.sequential * self.cache.table.shape[1]:
            order = np.argsort(to_read, kind="stable")
            to_read, slots = [to_read[i] for i in order], [slots[i] for i in order]
            fu = self.pool.submit(self.reader.read, layer, to_read, slots, self.cache, False)
            self._inflight.update({s: (layer, e, fu) for e, s in zip(to_read, slots)})
        else:
            for e, s in zip(to_read, slots):
                self._inflight[s] = (layer, e, self.pool.submit(self.reader.read, layer, [e], [s], self.cache, False))
        self.prefetched[layer] += len(to_read)

    def settle(self, layer: int, experts: list[int]) -> set[int]:
        """The real routing of `layer` asks for `experts`: wait for the background reads of those, count
        hits, demote the wrong guesses. Returns the slots the demand placement must avoid (reads of other
        records still in flight); if too few slots would be left for `experts`, waits for every read. The
        time spent waiting is the model's wait for reads: it goes to the reader's stats.expert_io."""
        t0 = time.perf_counter()
        guess = self._guess.pop(layer, None)
        row = self.cache.table[layer]
        want = set(experts)
        for s, (_, _, fu) in list(self._inflight.items()):  # not started yet: dropped (wanted ones are
            if fu.cancel():  # read on demand below, over the reader's whole pool)
                del self._inflight[s]
                self.cache.invalidate([s])
                self.dropped[layer] += 1
        if guess is None:  # nothing guessed for this step's layer (layer 0, a prefill)
            guess = set()
        else:
            self.needed[layer] += len(want)
            self.hits[layer] += len(want & guess)
        for e in want:  # every wanted record a background read is writing (this guess's or an older one's)
            s = int(row[e])
            job = self._inflight.get(s)
            if job is None or job[:2] != (layer, e):
                if s >= 0 and e in guess:
                    self.ready[layer] += 1  # resident, or read and reaped already
                continue
            if job[2].done() and e in guess:
                self.ready[layer] += 1
            job[2].exception()  # wait; a failure is handled by _reap (the demand path re-reads it)
        self._reap()
        wrong = [int(row[e]) for e in guess - want if row[e] >= 0]
        self.cache.demote(wrong)
        busy = set(self._inflight)
        if self.cache.slots < len(want) + len(busy):
            self.drain()
            busy = set()
        if self.reader.stats is not None:
            self.reader.stats.expert_io += time.perf_counter() - t0
        return busy

    def drain(self) -> None:
        """Wait for every background read (before the cache is cleared or the reader closed)."""
        for _, _, fu in list(self._inflight.values()):
            fu.exception()
        self._reap()
        self._guess.clear()

    def hit_rate(self) -> dict[int, float]:
        """Per layer: the share of the experts the real routing asked for that had been guessed."""
        return {layer: self.hits[layer] / n for layer, n in sorted(self.needed.items()) if n}

    def close(self) -> None:
        self.drain()
        self.pool.shutdown(wait=True)
