"""The ranks' control plane (runtime/distributed.py): broadcast from rank 0 and gather with mx.distributed
collectives only, each under a watchdog that ends this process when a collective makes no progress; the
leader's plans (a step name and JSON arguments) and the followers' loop that runs them.

Failures end every rank within a bounded time, never a hang:
  * a rank whose process dies closes its sockets: the others' next collective fails at once
    ("[ring] connection to a peer was lost") and they stop with a DistributedError;
  * a rank that hangs or a host that becomes unreachable closes nothing, and a ring all_sum with such
    a peer blocks forever: the Watchdog ends this process when a collective makes no progress for
    `timeout` seconds (it is re-armed at every MoE layer, so long prefills are fine). While the leader
    is idle it broadcasts an empty plan every `timeout / 4` seconds, so followers can tell "idle" from
    "gone".
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import mlx.core as mx
import numpy as np
from flashmoe.errors import FlashmoeError

DEFAULT_TIMEOUT_S = 60.0  # longest wait in one collective (one MoE layer's imbalance) before giving up
LOAD_TIMEOUT_S = 900.0  # how long the ranks wait for the slowest one to load its bundle
FRAME = 256  # int32 words in the first all_sum of a plan: [length, payload bytes ...]; the rest follows
EXIT_LOST = 2  # exit status of a rank stopped by the watchdog (an error the user can act on)


class DistributedError(FlashmoeError):
    """A rank stopped, hung, became unreachable, or holds a different bundle; str() says which and what to do."""


def _link_error(e: BaseException) -> bool:
    """A backend's error for a lost peer (ring: "[ring] connection to a peer was lost", and the like)."""
    s = str(e)
    return isinstance(e, RuntimeError) and any(t in s for t in ("[ring]", "[nccl]", "[mpi]", "[jaccl]", "peer"))


# ----------------------------------------------------------------------------------------------
# the watchdog


class Watchdog:
    """Ends this process if a guarded section makes no progress for `timeout` seconds.

    The main thread sits inside `mx.eval` during a collective (MLX releases the GIL there), so a Python
    thread can watch it; os._exit is the only way out of a blocked collective."""

    def __init__(self, rank: int, timeout: float, prog: str = "flashmoe"):
        self.rank, self.timeout, self.prog = rank, float(timeout), prog
        self._deadline: float | None = None
        self._limit = self.timeout
        self._what = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="flashmoe-watchdog", daemon=True)
        self._thread.start()

    def arm(self, what: str, timeout: float | None = None) -> None:
        with self._lock:
            self._what = what
            self._limit = self.timeout if timeout is None else float(timeout)
            self._deadline = time.monotonic() + self._limit

    def kick(self) -> None:
        """Progress: the deadline moves `timeout` seconds ahead (if armed)."""
        with self._lock:
            if self._deadline is not None:
                self._deadline = time.monotonic() + self._limit

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def guard(self, what: str, timeout: float | None = None):
        dog = self

        class _Guard:
            def __enter__(self):
                dog.arm(what, timeout)

            def __exit__(self, *exc):
                dog.disarm()
                return False

        return _Guard()

    def _watch(self) -> None:
        step = min(0.25, self.timeout / 4)
        while True:
            time.sleep(step)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what, limit = self._what, self._limit
            if late:
                fail_now(self.prog, f"rank {self.rank}: no answer from the other ranks for {limit:.0f} s while "
                                    f"{what}: a rank stopped or hung, or its host became unreachable. Stopping this "
                                    "rank; check the other ranks' errors and the network, then start all ranks again")


def fail_now(prog: str, msg: str) -> None:
    """Print one error line and end the process at once (threads blocked in a collective cannot be joined)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):  # a closed or broken stdout must not keep us from stopping
        pass
    sys.stderr.write(f"{prog}: error: {msg}\n")
    sys.stderr.flush()
    os._exit(EXIT_LOST)


# ----------------------------------------------------------------------------------------------
# the control plane: broadcast from rank 0 and gather, with all_sum / all_gather only


class Link:
    """The ranks' control collectives, each under the watchdog, with backend errors turned into
    DistributedError."""

    def __init__(self, group, watchdog: Watchdog):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.watchdog = watchdog

    def _all_sum(self, x: mx.array, what: str, timeout: float | None = None) -> np.ndarray:
        with self.watchdog.guard(what, timeout):
            try:
                y = mx.distributed.all_sum(x, group=self.group)
                mx.eval(y)
            except RuntimeError as e:
                if _link_error(e):
                    raise DistributedError(lost_message(self.rank, what, e)) from None
                raise
        return np.array(y)

    def broadcast(self, payload: bytes | None, what: str) -> bytes:
        """Rank 0 passes the bytes, the others None; every rank returns rank 0's bytes."""
        frame = np.zeros(FRAME, np.int32)
        if self.rank == 0:
            data = np.frombuffer(payload, np.uint8).astype(np.int32)
            frame[0] = len(data)
            head = data[: FRAME - 1]
            frame[1 : 1 + len(head)] = head
        got = self._all_sum(mx.array(frame), what)
        n = int(got[0])
        body = got[1 : 1 + min(n, FRAME - 1)]
        if n > FRAME - 1:  # the rest in one more collective
            rest = data[FRAME - 1 :] if self.rank == 0 else np.zeros(n - (FRAME - 1), np.int32)
            body = np.concatenate([body, self._all_sum(mx.array(rest), what)])
        return body.astype(np.uint8).tobytes()

    def gather(self, row: np.ndarray, what: str, timeout: float | None = None) -> np.ndarray:
        """Every rank's int32 row (same length everywhere), as [size, len]."""
        row = np.asarray(row, np.int32).reshape(-1)
        mine = np.zeros((self.size, len(row)), np.int32)
        mine[self.rank] = row
        return self._all_sum(mx.array(mine), what, timeout).reshape(self.size, len(row))


def lost_message(rank: int, what: str, e: BaseException) -> str:
    return (f"rank {rank}: lost the connection to another rank while {what} ({e}): a rank stopped (its own "
            "error says why) or its host became unreachable. Start all ranks again")


# ----------------------------------------------------------------------------------------------
# plans: the leader calls, the followers follow


_STOP, _NOOP = "__stop__", "__noop__"


class Leader:
    """Rank 0's side: `call(name, *args)` broadcasts the plan, then runs target.name(*args) here.
    Arguments must be JSON (ints, lists, bools, None). A heartbeat thread sends an empty plan while no
    call is made, so that idle followers know rank 0 is alive."""

    def __init__(self, dist, target):
        self.dist, self.target = dist, target
        self._lock = threading.RLock()
        self._last = time.monotonic()
        self._closed = False
        self.interval = max(0.5, dist.timeout / 4)
        self._beat = threading.Thread(target=self._heartbeat, name="flashmoe-heartbeat", daemon=True)
        self._beat.start()

    def _send(self, name: str, args: tuple, what: str) -> None:
        msg = json.dumps([name, list(args)], separators=(",", ":")).encode()
        self.dist.link.broadcast(msg, what)
        self._last = time.monotonic()

    def call(self, name: str, *args):
        with self._lock, _sigint_deferred():  # a plan sent is a plan run: Ctrl-C lands after the call
            if self._closed:
                raise DistributedError("the ranks were already released, or the link to them was lost")
            try:
                self._send(name, args, f"sending the plan for {name}")
            except DistributedError:
                self._closed = True  # no later plan (a reset after this failure) may wait on a lost rank
                raise
            dog = self.dist.watchdog
            try:
                with dog.guard(f"running {name} with the other ranks"):
                    self.dist.in_plan = True
                    return getattr(self.target, name)(*args)
            except RuntimeError as e:
                if _link_error(e):
                    self._closed = True
                    raise DistributedError(lost_message(self.dist.rank, f"running {name}", e)) from None
                raise
            finally:
                self.dist.in_plan = False

    def close(self) -> None:
        """Release the followers (they return from `follow`). Safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    self._send(_STOP, (), "releasing the other ranks")
                except DistributedError:
                    pass  # they are gone already

    def abandon(self) -> None:
        """Stop the heartbeat without telling anyone (the other ranks are gone)."""
        self._closed = True

    def _heartbeat(self) -> None:
        while True:
            time.sleep(self.interval / 2)
            if self._closed:
                return
            if time.monotonic() - self._last < self.interval or not self._lock.acquire(blocking=False):
                continue
            try:
                if not self._closed:
                    self._send(_NOOP, (), "waiting for work (heartbeat)")
            except DistributedError as e:
                fail_now(self.dist.prog, str(e))
            finally:
                self._lock.release()


class _sigint_deferred:
    """On the main thread, hold a Ctrl-C until the block ends (then raise it): the followers run every
    plan the leader sends, so the leader must run it too, or the ranks' collectives fall out of step."""

    def __enter__(self):
        self.prev = None
        if threading.current_thread() is threading.main_thread():
            self.hit = False
            self.prev = signal.signal(signal.SIGINT, self._hold)

    def _hold(self, *_):
        self.hit = True

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)
            if self.hit and exc[0] is None:
                raise KeyboardInterrupt
        return False


def follow(dist, target) -> None:
    """A follower's loop: run each plan rank 0 broadcasts on `target`, until rank 0 releases us. An
    error here (a missing file, a lost rank) propagates; rank 0 then sees this rank leave and stops."""
    dog = dist.watchdog
    dist.in_plan = True  # a follower runs nothing but plans
    while True:
        raw = dist.link.broadcast(None, "waiting for rank 0's next step")
        name, args = json.loads(raw.decode())
        if name == _STOP:
            return
        if name == _NOOP:
            continue
        try:
            with dog.guard(f"running {name} with the other ranks"):
                getattr(target, name)(*args)
        except RuntimeError as e:
            if _link_error(e):
                raise DistributedError(lost_message(dist.rank, f"running {name}", e)) from None
            raise
