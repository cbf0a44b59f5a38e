"""The pass planner of flashmoe-batch (batch/passes.py) and its clock (batch/progress.py), by hand: waves as large
as the room admits, refills once half the batch is free, the prefill cost as a parameter, the finish estimate."""

from __future__ import annotations

import math

from collections import deque

import pytest

from flashmoe.batch.passes import REFILL_SHARE, Plan, Room, Waves, plan
from flashmoe.batch.progress import PassClock
from flashmoe.runtime.engine import MemoryPlan


def chunked(prefill_tokens: int):
    """A prefill cost model for the hand computations: forwards of `prefill_tokens` tokens, all rows left-padded
    together (how a runner that does not run layer-major prefills: runtime/runner.forward_chunks)."""
    return lambda lens: math.ceil(max(lens) / max(1, prefill_tokens // len(lens)))


def test_plan_of_equal_documents_by_hand():
    # 10 documents of 100 tokens, 5 to generate, 4 rows: waves of 4, 4, 2. A wave of 4 prefills in
    # ceil(100 / (64 // 4)) = 7 passes, one of 2 in ceil(100 / 32) = 4; each wave's rows then decode 4 steps
    # (the prefill chose the first token), the last of which ends them.
    p = plan([(100, 5)] * 10, Room(4), chunked(64))
    assert p == Plan(prefill=7 + 7 + 4, decode=4 * 3, steps=4 * 3, waves=3)
    assert p.passes == 30
    # the prefill cost is the caller's: one pass a wave (a runner prefilling a wave layer by layer)
    assert plan([(100, 5)] * 10, Room(4), lambda lens: 1) == Plan(3, 12, 12, 3)
    assert plan([(10, 1)] * 3, Room(4), lambda lens: 1) == Plan(1, 0, 1, 1)  # one token each: no decode pass
    assert plan([], Room(4), lambda lens: 1) == Plan(0, 0, 0, 0)


def test_refill_waits_for_half_the_batch():
    assert REFILL_SHARE == 0.5
    # 4 rows; two documents end after 1 decode step, the others run 8: at that point 2 of 4 rows are free,
    # half the batch, so the next wave joins then (not when the long ones end)
    docs = [(10, 9), (10, 9), (10, 2), (10, 2), (10, 9), (10, 9)]
    p = plan(docs, Room(4), lambda lens: 1)
    # step 1: wave 1 prefills and decodes (short ones end); step 2: wave 2 joins; the long ones of wave 1
    # end after 8 decode steps (step 8), wave 2's after step 9
    assert p == Plan(prefill=2, decode=9, steps=9, waves=2)
    # one free row of 4 is not enough to refill...
    waves = Waves(Room(4), lambda d: d)
    q = deque([5, 5, 5])
    assert waves.take(q, [5, 5, 5]) == [] and len(q) == 3
    assert waves.take(q, [5, 5]) == [5, 5]  # ...two are
    assert waves.take(q, [5, 5, 5]) == [5]  # and the queue's last document joins whenever it fits
    assert waves.waves == 2


def test_room_is_the_memory_plan():
    mp = MemoryPlan(state_bytes=100, kv_bytes_per_token=1, budget_bytes=1000, max_batch=8, reference_context=0)
    room = Room(8, mp)
    assert room.fits([5000])  # one row always (the engine refuses a too-large one when it is added)
    assert room.fits([150] * 4) and not room.fits([150] * 5)  # 4 x (100 + 150) = 1000
    assert not room.fits([10] * 9)  # max rows
    # rows are as long as the longest: a long document in the wave shrinks it
    waves = Waves(room, lambda d: d)
    assert waves.take(deque([400, 100, 100, 100]), []) == [400, 100]  # 2 x 500; a third row would be 1500
    p = plan([(100, 50)] * 9, room, lambda lens: 1)
    assert p.waves == 3  # 4 + 4 + 1


def test_pass_clock():
    c = PassClock()
    assert c.rates() is None and c.remaining(3, 3) is None and c.timed == 0
    c.record(3, 1, 8.0)  # a wave: 3 prefill passes and a decode pass in one step
    assert c.rates() == (2.0, 2.0)  # no decode-only step yet: one rate
    c.record(0, 1, 1.0)
    c.record(0, 1, 3.0)
    assert c.rates() == (pytest.approx((8.0 - 2.0) / 3), 2.0)  # decode 2 s a pass, taken out of the wave's step
    assert c.remaining(3, 10) == pytest.approx(3 * 2.0 + 10 * 2.0)
    assert c.remaining(-1, 0) == 0
    c.record(0, 0, 5.0)  # a step with no pass (nothing decoded, nothing prefilled) times nothing
    assert c.timed == 3 + 1 + 1 + 1
