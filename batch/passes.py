"""Passes: how a batch job spends reads of the model's experts, and the order of work that keeps them few.

A pass is one read of the experts: one forward of a prefill chunk, or one decode step of the running
batch (each reads every layer's routed experts once for all its rows; with a large batch, about all of
them). A job's time is about its number of passes, and a decode step costs one pass whatever the batch,
so the job runs in waves (`Waves`): as many documents as the engine's memory plan admits (`Room`) join
together, prefill together and decode together. Rows that finish early are refilled by the next wave once
at least REFILL_SHARE of the batch is free (or the queue's rest fits): a refill costs its prefill passes
whole, rows left empty cost their share of each decode pass, and waiting for half the batch bounds both.

`plan` runs that policy on the job's sizes (every document generating its max_tokens, the most it can)
and counts the passes before the job starts. What a wave's prefill costs is a parameter (`prefill_cost`, a
function of the wave's prompt lengths): the runner's own count (`BatchRunner.prefill_passes`: a layer-major
prefill reads each layer's experts once per wave, unless the wave's hidden states outgrow their budget).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

REFILL_SHARE = 0.5  # a running batch takes a new wave once this share of the rows it could hold is free

PrefillCost = Callable[[list[int]], int]  # prompt lengths of a wave -> its prefill passes


@dataclass(frozen=True)
class Room:
    """What the engine admits (runtime/engine.py Engine._admit): at most `max_rows` rows, and, past the first,
    only while their state, each row as long as the longest (prompt + max_tokens), fits `plan`'s budget."""

    max_rows: int
    plan: object = None  # a runtime.engine.MemoryPlan; None: rows are the only bound

    def fits(self, totals: list[int]) -> bool:
        if len(totals) > self.max_rows:
            return False
        if self.plan is None or len(totals) <= 1:
            return True
        return self.plan.bytes_for(len(totals), max(totals)) <= self.plan.budget_bytes


class Waves:
    """Which queued documents join at the next step: as many as `room` admits beside the running rows, taken
    in queue order; none while the running batch is more than (1 - REFILL_SHARE) full, unless they are the
    queue's rest. `total(doc)`: its prompt tokens + max_tokens."""

    def __init__(self, room: Room, total: Callable[[object], int]):
        self.room = room
        self.total = total
        self.waves = 0

    def take(self, queue: deque, running: list[int]) -> list:
        """`running`: each running row's total. Pops and returns the wave (possibly empty)."""
        rows = list(running)
        n = 0
        while n < len(queue) and self.room.fits(rows + [self.total(queue[n])]):
            rows.append(self.total(queue[n]))
            n += 1
        if not n or (running and n < len(queue) and n < REFILL_SHARE * (len(running) + n)):
            return []
        self.waves += 1
        return [queue.popleft() for _ in range(n)]


@dataclass(frozen=True)
class Plan:
    prefill: int  # prefill passes
    decode: int  # decode passes (steps that decode running rows)
    steps: int
    waves: int = 0

    @property
    def passes(self) -> int:
        return self.prefill + self.decode


def plan(docs: list[tuple[int, int]], room: Room, prefill_cost: PrefillCost) -> Plan:
    """Passes for documents (prompt tokens, max_tokens), in this order, under `Waves` in `room`, if every
    document generates its max_tokens (an upper bound: a stop string or the end-of-text token finishes it
    sooner). Each engine step prefills the joining wave, then decodes every row with tokens still to make."""
    queue = deque(docs)
    waves = Waves(room, lambda d: d[0] + d[1])
    running: list[tuple[int, int]] = []  # (total, tokens still to generate) of each running row
    prefill = decode = steps = 0
    while queue or running:
        joining = waves.take(queue, [t for t, _ in running])  # never empty when nothing runs
        prefill += prefill_cost([p for p, _ in joining]) if joining else 0
        running += [(p + m, m - 1) for p, m in joining if m > 1]  # the prefill chose each one's first token
        if running:
            decode += 1
            running = [(t, r - 1) for t, r in running if r > 1]
        steps += 1
    return Plan(prefill, decode, steps, waves.waves)
