"""One thread drives the batched engine; HTTP handlers (on the asyncio loop) submit requests and read
their events from per-request asyncio queues.

Engine.add and Engine.cancel are thread-safe; Engine.step runs only on the worker thread, which sleeps
while the engine has no work. A request that ends early (client gone) is cancelled at once, freeing its
rows at the next step. The number of requests in flight is bounded: past a full batch + max_queue, submit
raises Overloaded (the server answers 429)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass


class Overloaded(Exception):
    pass


class EngineFailed(Exception):
    """Engine.step raised: every request in flight ends with this (an internal fault, not the client's)."""


@dataclass
class Ticket:
    seq_id: int
    queue: asyncio.Queue


class EngineWorker:
    def __init__(self, engine, max_queue: int = 64):
        self.engine = engine
        batch = max(1, min(int(engine.max_batch), int(engine.plan.max_batch)))  # rows that fit at once
        self.limit = batch + max(0, int(max_queue))
        self._cond = threading.Condition()
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="flashmoe-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)  # a step in progress finishes first (a daemon thread: never blocks exit)
            self._thread = None

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._queues)

    # ---- requests -----------------------------------------------------------------------------
    def submit(self, ids: list[int], params) -> Ticket:
        """Admit one sequence (call on the event loop); raises Overloaded, or the engine's InputError /
        CapacityError for a bad or too-long prompt. Read it with events(ticket)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            if len(self._queues) >= self.limit:
                raise Overloaded(f"the server is busy ({len(self._queues)} requests in flight, the limit is "
                                 f"{self.limit}); retry later")
            seq_id = self.engine.add(ids, params)
            self._queues[seq_id] = (loop, queue)
            self._cond.notify_all()
        return Ticket(seq_id, queue)

    async def events(self, ticket: Ticket) -> AsyncIterator:
        """The sequence's events up to its finish event; leaving early (an exception, the client gone,
        the consumer closing the generator) cancels the sequence."""
        done = False
        try:
            while True:
                ev = await ticket.queue.get()
                if isinstance(ev, BaseException):
                    done = True
                    raise ev
                done = ev.finish_reason is not None
                yield ev
                if done:
                    return
        finally:
            if not done:
                self.cancel(ticket.seq_id)

    def cancel(self, seq_id: int) -> None:
        with self._cond:
            if seq_id in self._queues:
                self.engine.cancel(seq_id)
                self._cond.notify_all()

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.engine.has_work():
                    self._cond.wait()
                if self._stop:
                    return
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a bug in the engine: fail the requests in flight, keep serving
                self._fail_all(EngineFailed(f"engine step failed: {type(e).__name__}: {e}"))
                time.sleep(0.05)  # no busy loop should the engine keep failing
                continue
            with self._cond:
                for ev in events:
                    entry = self._queues.get(ev.seq_id)
                    if entry is None:
                        continue
                    if ev.finish_reason is not None:
                        del self._queues[ev.seq_id]
                    self._deliver(entry, ev)

    def _fail_all(self, err: Exception) -> None:
        with self._cond:
            entries = list(self._queues.items())
            self._queues.clear()
        for seq_id, entry in entries:
            self.engine.cancel(seq_id)
            self._deliver(entry, err)

    @staticmethod
    def _deliver(entry, item) -> None:
        loop, queue = entry
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (server shutting down)
            pass
