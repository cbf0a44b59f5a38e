"""Passes: how a batch job spends reads of the model's experts, and the order of work that keeps them few.

A pass is one read of the experts: one forward of a prefill chunk, or one decode step of the running
batch (each reads every layer's routed experts once for all its rows). A job's time is about its number
of passes, so documents join in waves (`Waves`): the first small (one pass of prompt tokens) so that the
first answers are written within a few steps, the next ones a few passes of prompt tokens each, longest
first so that a wave's documents pad little, while the rows already running decode in the same steps.
`plan` runs that policy on the job's sizes (every document generating its max_tokens, the most it can)
and counts the passes before the job starts; `prefill_passes` is the engine's chunking.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

FIRST_WAVE_PASSES = 1  # prompt tokens of the first wave: one prefill pass
WAVE_PASSES = 4  # later waves: at most this many prefill passes per step (the running rows decode meanwhile)


def prefill_passes(lengths: list[int], prefill_tokens: int) -> int:
    """Forwards of one prefill of these prompts together (the engine left-pads them and runs
    prefill_tokens // rows positions per forward)."""
    if not lengths:
        return 0
    chunk = max(1, prefill_tokens // len(lengths))
    return math.ceil(max(lengths) / chunk)


class Waves:
    """Which queued documents join at the next step: up to `room` of them, their prompt tokens within this
    wave's budget (always at least one)."""

    def __init__(self, prefill_tokens: int):
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.waves = 0

    def take(self, queue: deque, room: int, length) -> list:
        passes = FIRST_WAVE_PASSES if self.waves == 0 else WAVE_PASSES
        budget, used, out = passes * self.prefill_tokens, 0, []
        while queue and len(out) < room and (not out or used + length(queue[0]) <= budget):
            used += length(queue[0])
            out.append(queue.popleft())
        self.waves += bool(out)
        return out


@dataclass(frozen=True)
class Plan:
    prefill: int  # prefill passes
    decode: int  # decode passes (steps that decode running rows)
    steps: int

    @property
    def passes(self) -> int:
        return self.prefill + self.decode


def plan(docs: list[tuple[int, int]], max_batch: int, prefill_tokens: int) -> Plan:
    """Passes for documents (prompt tokens, max_tokens), in this order, under `Waves` with at most
    `max_batch` rows at once, if every document generates its max_tokens (an upper bound: a stop string or
    the end-of-text token finishes it sooner)."""
    queue = deque(docs)
    waves = Waves(prefill_tokens)
    running: list[int] = []  # tokens each running row still has to generate
    prefill = decode = steps = 0
    while queue or running:
        joining = waves.take(queue, max_batch - len(running), lambda d: d[0])
        prefill += prefill_passes([p for p, _ in joining], prefill_tokens)
        running += [m - 1 for _, m in joining if m > 1]  # the prefill chose each one's first token
        if running:
            decode += 1
            running = [r - 1 for r in running if r > 1]
        steps += 1
    return Plan(prefill, decode, steps)
