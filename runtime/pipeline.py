"""The decode step as the device runs it: launched without waiting, synced later, undone when not needed.

    p = launch(model, ids, cache)          # ids [B, 1] may be lazy (the previous step's choice)
    ahead = launch(model, nxt, cache)      # optional: the next step, built on p's lazy result
    logits, choice, redone = finish(model, p, cache, after=ahead)   # redone: `ahead` is void
    cancel(model, ahead, cache)            # the sequence(s) ended: the step launched ahead is undone

When the expert source has a device-side cache worth trusting (`experts.optimistic`), a step first runs
against it with no host round trip per layer (`experts.lookup`); if some expert was not resident (or a
guard fired) the step is rolled back and run again the ordinary way. The engine (runtime/engine.py) is
the only caller: it pipelines batched steps, greedy and sampled alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import Cache
from .integrity import check_logits, logit_flags


@dataclass
class PendingDecode:
    """A decode step on the device, not yet synced (`launch`)."""

    ids: mx.array  # [B, 1] the tokens fed
    saved: tuple  # the cache state before the step (for a rollback)
    logits: mx.array  # [B, 1, V]
    choice: mx.array  # [B] each row's argmax (lazy: the next step may be built on it)
    pack: mx.array  # int32: miss flag, 3 logit guards, B choices, then each layer's expert ids
    used: list  # (layer, number of expert ids) in pack order


def launch(model, ids: mx.array, cache: Cache) -> PendingDecode:
    """Build the decode step of `ids` [B, 1] and start it on the device without waiting."""
    saved = ([c.snapshot() for c in cache.layers], cache.offset)
    lookups = [] if model.experts.optimistic else None
    logits = model(ids, cache, last_only=True, lookups=lookups)
    last = logits[:, -1].astype(mx.float32)  # [B, V]
    i32 = mx.int32
    guard = logit_flags(last).astype(i32)  # what check_logits tests, without a sync of its own
    choice = mx.argmax(last, axis=-1).astype(i32)  # [B]
    parts = [guard, choice]
    if lookups:  # one flag for every layer's misses and guards, then every layer's expert ids
        parts.insert(0, mx.any(mx.stack([mx.any(sl < 0) | bad for _, _, sl, bad in lookups]))[None].astype(i32))
        parts += [i.reshape(-1).astype(i32) for _, i, _, _ in lookups]
    else:
        parts.insert(0, mx.zeros((1,), i32))
    pack = mx.concatenate(parts)  # everything the host needs from this step, in one transfer
    mx.async_eval(logits, pack)
    return PendingDecode(ids, saved, logits, choice, pack, [(layer, i.size) for layer, i, _, _ in lookups or []])


def finish(model, p: PendingDecode, cache: Cache, after: PendingDecode | None = None) -> tuple[mx.array, np.ndarray, bool]:
    """Sync a launched step. Returns (logits [B, 1, V], each row's argmax [B], whether it was redone). A
    step that missed is rolled back and rerun the ordinary way; `after` (a step launched on top of it, now
    void) is waited for first, so no kernel still reads a slot the rerun refills."""
    host = np.array(p.pack)
    B = p.choice.shape[0]
    guard, choice = host[1:4], host[4 : 4 + B]
    redone = bool(host[0])
    used = []
    if not redone and p.used:
        pos = 4 + B
        for layer, n in p.used:
            used.append((layer, host[pos : pos + n]))
            pos += n
    if p.used or redone:
        model.experts.commit(used, hit=not redone)
    logits = p.logits
    if redone:
        if after is not None:
            mx.eval(after.pack)
        restore(cache, p.saved)
        logits = model(p.ids, cache, last_only=True)
        ch = mx.argmax(logits[:, -1].astype(mx.float32), axis=-1).astype(mx.int32)
        mx.eval(logits, ch)
        choice = np.array(ch)
    if redone or guard.any():  # a rerun's logits were not guarded yet; check_logits names what is wrong
        check_logits(logits[:, -1])
    return logits, choice, redone


def cancel(p: PendingDecode, cache: Cache) -> None:
    """Undo a launched step that will not be used (its sequences ended or the batch changed)."""
    mx.eval(p.pack)
    restore(cache, p.saved)


def restore(cache: Cache, saved) -> None:
    layers, offset = saved
    for c, old in zip(cache.layers, layers):
        c.restore(old)
    cache.offset = offset


def decode(model, ids: mx.array, cache: Cache) -> mx.array:
    """One unpipelined decode step: ids [B, 1] -> logits [B, 1, V], evaluated and checked."""
    return finish(model, launch(model, ids, cache), cache)[0]
