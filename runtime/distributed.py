"""One model across several processes or machines with `mx.distributed` (expert parallel).

    mlx.launch --hosts 10.0.0.1,10.0.0.2 flashmoe-run BUNDLE --prompt "..."

Every rank loads the same bundle (dense weights replicated) and owns the routed experts e with
e % size == rank: it reads and applies only those, and after each MoE layer the ranks add their partial
outputs with `all_sum` (runtime/experts.py; the shared expert is applied once, after the sum). So each
rank reads 1/size of the expert bytes from its own disk and caches 1/size of the model.

Rank 0 (the leader) owns tokenization, sampling and output. The other ranks (followers) run no front
end: they mirror the engine's model steps (runtime/runner.py: prefill, decode, rows leaving, reset,
prompt-cache stores), in the same order, told by a *plan* that the leader broadcasts before each step. A
plan is a step name and JSON arguments (token ids, sequence ids), sent with mx.distributed collectives
only: all_sum of a fixed-size int32 frame to which the other ranks contribute zeros (a second all_sum
carries what does not fit). Rank 0's Engine drives a LeaderRunner, which broadcasts each step and then
runs it on its own BatchRunner; `follow` is the followers' loop over theirs.

Failures end every rank within a bounded time, never a hang:
  * a rank whose process dies closes its sockets: the others' next collective fails at once
    ("[ring] connection to a peer was lost") and they stop with a DistributedError;
  * a rank that hangs or a host that becomes unreachable closes nothing, and a ring all_sum with such
    a peer blocks forever: a Watchdog thread ends this process when a collective makes no progress for
    `timeout` seconds (it is re-armed at every MoE layer, so long prefills are fine). While the leader
    is idle (a chat waiting for input, a server waiting for requests) it broadcasts an empty plan every
    `timeout / 4` seconds, so followers can tell "idle" from "gone". Loading, which takes as long as each
    host's disk needs, is waited for separately (up to LOAD_TIMEOUT_S, after which the ranks also stop).
At start the ranks compare their bundles (sha256 of the manifest, and the experts per token) and
whether each has its part of a sharded bundle (hub/shard.py); any mismatch stops every rank, naming
the rank.

What a front end calls: `start_from_env(prog)` (size 1 without a launcher: nothing changes), then
`dist.check_bundle(path, k)` before loading, `flashmoe.load(path, config, shard=dist.expert_shard())` and
`dist.wait_loaded()`, then on every rank `engine = make_engine(dist, model, tokenizer, engine_config)` and
`run_engine(dist, engine, body)`: rank 0 runs body(engine), the others follow (flashmoe-run, -batch,
-serve); `follow_engine(...)` does a follower's whole part.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from flashmoe.format.errors import BundleError, FlashmoeError
from flashmoe.hub.shard import SHARD_MARKER  # written by `flashmoe-pull --shard r/N`

from .config import EngineConfig
from .engine import Engine
from .experts import ExpertShard
from .runner import PREFILL_TOKENS, BatchRunner, PromptCache

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
# who we are


class Dist:
    """This process's place among the ranks: group, shard, watchdog and control link. size == 1 (no
    launcher) means a single process: nothing is sent and nothing changes."""

    def __init__(self, group, timeout: float = DEFAULT_TIMEOUT_S, prog: str = "flashmoe"):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.prog = prog
        self.timeout = float(timeout)
        self.watchdog = Watchdog(self.rank, timeout, prog) if self.size > 1 else None
        self.in_plan = False  # inside a plan's call, where model forwards are mirrored on every rank
        self.link = Link(group, self.watchdog) if self.size > 1 else None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, launched: bool, timeout: float = DEFAULT_TIMEOUT_S, prog: str = "flashmoe") -> Dist:
        """Join the group. `launched`: a launcher (mlx.launch, mpirun) started this process, so failing to
        join is an error rather than a silent single process that would print the output N times."""
        if timeout <= 0:
            raise DistributedError(f"the distributed timeout must be > 0 seconds (got {timeout})")
        try:
            group = mx.distributed.init(strict=launched)
        except RuntimeError as e:
            raise DistributedError(f"could not join the other ranks ({e}); check the hostfile, that every host "
                                   "can reach the others on the ports mlx.launch chose, and start all ranks again") from None
        return cls(group, timeout, prog)

    # ---- checks at start ---------------------------------------------------------------------
    def check_bundle(self, bundle_dir, experts_per_token: int | None = None) -> None:
        """Every rank holds the same conversion and its own part of it; otherwise every rank stops with
        an error naming the ranks. Call before loading (a sharded bundle lacks other ranks' records)."""
        bundle_dir = Path(os.fspath(bundle_dir)).expanduser()
        if not (bundle_dir / "flashmoe.json").is_file():
            if self.size == 1:
                return  # a Hub repo id, a typo or an unfinished conversion: flashmoe.load resolves or reports it
            raise BundleError(f"rank {self.rank} of {self.size}: {bundle_dir} is not a bundle directory on this host; "
                              f"give every rank a local copy (on this host: `flashmoe-pull REPO --shard "
                              f"{self.rank}/{self.size} -o DIR`)")
        problem = bundle_part_problem(bundle_dir, ExpertShard(self.rank, self.size))
        if self.size == 1:
            if problem:
                raise BundleError(problem)
            return
        digest = bundle_digest(Path(bundle_dir), experts_per_token)
        row = np.concatenate([[0 if problem is None else 1], np.frombuffer(digest, np.uint8)]).astype(np.int32)
        rows = self.link.gather(row, "comparing bundles at start")
        if problem is not None:
            raise BundleError(problem)
        missing = [r for r in range(self.size) if rows[r, 0]]
        if missing:
            raise DistributedError(f"rank {self.rank}: rank(s) {', '.join(map(str, missing))} lack their part of the "
                                   "bundle (their own errors name the file and the fix); stopping every rank")
        ref = rows[0, 1:]
        differ = [r for r in range(self.size) if not np.array_equal(rows[r, 1:], ref)]
        if differ:
            raise DistributedError(
                f"rank {self.rank}: rank(s) {', '.join(map(str, differ))} run a different bundle (another conversion "
                "or revision) or other settings than rank 0: every rank needs a copy of the same bundle "
                "(flashmoe-pull the same repo and revision on each host) and the same flags")

    def expert_shard(self) -> ExpertShard | None:
        """This rank's part of the experts, for flashmoe.load(..., shard=...): it reads and applies only its
        share and adds the ranks' parts with all_sum; at each MoE layer the watchdog sees progress, and a
        forward that no step announced is refused (the other ranks would not run it, and every later
        collective would pair with the wrong one). None for a single process."""
        if self.size == 1:
            return None
        return ExpertShard(self.rank, self.size, self.group, self._layer_guard)

    def _layer_guard(self) -> None:
        if not self.in_plan:
            raise RuntimeError("a model forward ran outside a broadcast step (a call that LeaderRunner does "
                               "not send); the ranks would fall out of step")
        self.watchdog.kick()

    def wait_loaded(self) -> None:
        """After loading (with shard=self.expert_shard()): wait for every rank to have loaded. Loading takes
        as long as each host's disk needs, so this wait has a bound of its own (LOAD_TIMEOUT_S)."""
        if self.size > 1:
            self.link.gather([1], "waiting for every rank to load the bundle", max(self.timeout, LOAD_TIMEOUT_S))


def bundle_digest(bundle_dir: Path, experts_per_token: int | None) -> bytes:
    """sha256 of the manifest (which names the conversion and every file's sha256) and the run settings
    every rank must share."""
    h = hashlib.sha256((bundle_dir / "flashmoe.json").read_bytes())
    h.update(json.dumps({"experts_per_token": experts_per_token}).encode())
    return h.digest()


def bundle_part_problem(bundle_dir: Path, shard: ExpertShard) -> str | None:
    """Why this rank cannot run from `bundle_dir` (a message naming the rank, the file and the fix), or
    None. A bundle pulled with `flashmoe-pull --shard r/N` holds only rank r's expert records and says so
    in SHARD_MARKER; a whole bundle serves any rank."""
    from flashmoe.format.bundle import expert_path

    who = f"rank {shard.rank} of {shard.size}"
    marker = bundle_dir / SHARD_MARKER
    if not (bundle_dir / "flashmoe.json").is_file():
        return (f"{who}: {bundle_dir / 'flashmoe.json'} is missing: this host has no copy of the bundle. On this host "
                f"run `flashmoe-pull REPO --shard {shard.rank}/{shard.size} -o {bundle_dir}` (or copy the bundle there)")
    if not marker.is_file():
        return None
    try:
        m = json.loads(marker.read_text())
        have = ExpertShard(int(m["rank"]), int(m["size"]))
    except (OSError, ValueError, KeyError, TypeError):
        return f"{who}: {marker} is unreadable; re-run `flashmoe-pull REPO --shard {shard.rank}/{shard.size} -o {bundle_dir}`"
    fix = (f"on this host run `flashmoe-pull REPO --shard {shard.rank}/{shard.size} -o DIR` and give this rank that "
           "directory (or a whole bundle)")
    if (have.rank, have.size) != (shard.rank, shard.size):
        if shard.size == 1:
            return (f"{bundle_dir} holds only the experts of shard {have.rank}/{have.size} (flashmoe-pull --shard): run it "
                    f"on {have.size} ranks with mlx.launch, or pull the whole bundle without --shard")
        return f"{who}: {bundle_dir} holds the experts of shard {have.rank}/{have.size}, not this rank's; {fix}"
    if m.get("manifest_sha256") != hashlib.sha256((bundle_dir / "flashmoe.json").read_bytes()).hexdigest():
        return f"{who}: {marker} belongs to another version of the bundle; {fix}"
    layers = json.loads((bundle_dir / "flashmoe.json").read_text())["config"].get("num_hidden_layers", 0)
    for layer in range(int(layers)):
        p = bundle_dir / expert_path(layer)
        if not p.is_file():
            return f"{who}: {p} is missing; {fix} (it resumes)"
    return None


# ----------------------------------------------------------------------------------------------
# plans: the leader calls, the followers follow


_STOP, _NOOP = "__stop__", "__noop__"


class Leader:
    """Rank 0's side: `call(name, *args)` broadcasts the plan, then runs target.name(*args) here.
    Arguments must be JSON (ints, lists, bools, None). A heartbeat thread sends an empty plan while no
    call is made, so that idle followers know rank 0 is alive."""

    def __init__(self, dist: Dist, target):
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
                raise DistributedError("the ranks were already released (Leader.close)")
            self._send(name, args, f"sending the plan for {name}")
            dog = self.dist.watchdog
            try:
                with dog.guard(f"running {name} with the other ranks"):
                    self.dist.in_plan = True
                    return getattr(self.target, name)(*args)
            except RuntimeError as e:
                if _link_error(e):
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


def follow(dist: Dist, target) -> None:
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


# ----------------------------------------------------------------------------------------------
# the engine's runner behind plans


class RunnerPlans:
    """The steps a follower mirrors: its BatchRunner's, with JSON-friendly arguments ((sid, ids) pairs, not
    dicts with int keys). Decode steps are never pipelined across ranks (RoutedExperts turns the optimistic
    path off for a shard), so `launch` runs the whole step."""

    def __init__(self, runner: BatchRunner):
        self.runner = runner

    def prefill(self, seqs: list):
        return self.runner.prefill([(int(sid), [int(t) for t in ids]) for sid, ids in seqs])

    def launch(self, tokens: list[int]):
        return self.runner.launch([int(t) for t in tokens])

    def remove(self, seq_ids: list[int], keep: list | None):
        return self.runner.remove([int(s) for s in seq_ids],
                                  None if keep is None else {int(sid): [int(t) for t in ids] for sid, ids in keep})

    def reset(self):
        return self.runner.reset()

    def store(self, ids: list[int]):
        return self.runner.store([int(t) for t in ids])


class LeaderRunner:
    """Rank 0's runner: the BatchRunner interface the Engine drives, each model step broadcast to the
    followers and then run here. Steps are never pipelined (`pipelined` is False), so a launched step is
    always finished and never cancelled; `finish` only syncs it here."""

    pipelined = False

    def __init__(self, runner: BatchRunner, leader: Leader):
        self.local = runner
        self.leader = leader

    @property
    def model(self):
        return self.local.model

    @property
    def rows(self) -> list[int]:
        return self.local.rows

    @property
    def cache(self):
        return self.local.cache

    @property
    def prompt_cache(self):
        return self.local.prompt_cache

    def cache_bytes(self) -> int:
        return self.local.cache_bytes()

    def prefill(self, seqs):
        return self.leader.call("prefill", [[int(sid), [int(t) for t in ids]] for sid, ids in seqs])

    def launch(self, tokens):
        return self.leader.call("launch", [int(t) for t in np.asarray(tokens).reshape(-1)])

    def finish(self, p, after=None):
        return self.local.finish(p, after)

    def cancel(self, p):
        raise RuntimeError("a distributed run never launches a step ahead, so none is cancelled")

    def remove(self, seq_ids, keep=None):
        pairs = None if keep is None else [[int(sid), [int(t) for t in ids]] for sid, ids in keep.items()]
        return self.leader.call("remove", [int(s) for s in seq_ids], pairs)

    def reset(self) -> None:
        """Every rank drops its rows. With the link gone (the failure itself), only this rank can."""
        try:
            self.leader.call("reset")
        except DistributedError:
            self.local.reset()

    def store(self, ids):
        return self.leader.call("store", [int(t) for t in ids])


# ----------------------------------------------------------------------------------------------
# what the CLIs call


LAUNCHER_VARS = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # set by mlx.launch / mpirun on every rank


def start_from_env(prog: str, environ=None) -> Dist:
    """For CLIs only: join the ranks if a launcher started us (MLX_RANK etc.), with the collective timeout
    FLASHMOE_DIST_TIMEOUT (seconds, default 60). Without a launcher: a single process, nothing changes."""
    env = os.environ if environ is None else environ
    raw = env.get("FLASHMOE_DIST_TIMEOUT", "").strip()
    try:
        timeout = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"FLASHMOE_DIST_TIMEOUT={raw!r}: give a number of seconds") from None
    return Dist.start(any(v in env for v in LAUNCHER_VARS), timeout, prog)


def make_engine(dist: Dist, model, tokenizer, config: EngineConfig | None = None,
                prompt_cache: PromptCache | None = None) -> Engine:
    """The Engine every rank builds alike (the same flags: its runner's prefill chunking and prompt cache
    must match). On rank 0 of several, its runner broadcasts each model step to the other ranks."""
    config = (config or EngineConfig()).check()
    if prompt_cache is None and config.prompt_cache_gb > 0:
        prompt_cache = PromptCache(int(config.prompt_cache_gb * 1e9))
    runner = BatchRunner(model, config.prefill_tokens or PREFILL_TOKENS, prompt_cache)
    if dist.size > 1 and dist.leader:
        runner = LeaderRunner(runner, Leader(dist, RunnerPlans(runner)))
    return Engine(model, tokenizer, config, runner=runner)


def run_engine(dist: Dist, engine: Engine, body) -> int | None:
    """Run a front end on the engine from make_engine (flashmoe-run, flashmoe-batch, flashmoe-serve): rank 0
    runs body(engine), the other ranks mirror its model steps until rank 0 is done, then return 0. A single
    process: body(engine)."""
    if dist.size == 1:
        return body(engine)
    if not dist.leader:
        follow(dist, RunnerPlans(engine.runner))
        return 0
    if not isinstance(engine.runner, LeaderRunner):
        raise DistributedError("rank 0's engine does not send its steps to the other ranks: build it with "
                               "make_engine(dist, ...)")
    return _lead(engine.runner.leader, lambda: body(engine))


def _lead(leader: Leader, body) -> int | None:
    try:
        rc = body()
    except DistributedError:
        leader.abandon()  # the link is gone: nothing to release
        raise
    except BaseException:
        leader.close()
        raise
    leader.close()
    return rc


def follow_engine(dist: Dist, bundle, load_kw: dict | None = None, engine_kw: dict | None = None) -> int:
    """A follower of flashmoe-batch / flashmoe-serve: load the bundle and build the Engine exactly as rank 0
    does, then mirror rank 0's model steps until it is done. Returns the exit status (0)."""
    import flashmoe

    load_kw = dict(load_kw or {})
    k = load_kw.get("experts_per_token") or getattr(load_kw.get("config"), "experts_per_token", None)
    dist.check_bundle(bundle, k)
    model, tokenizer = flashmoe.load(bundle, shard=dist.expert_shard(), **load_kw)
    dist.wait_loaded()
    config = EngineConfig(**{k: v for k, v in (engine_kw or {}).items() if v is not None})
    return run_engine(dist, make_engine(dist, model, tokenizer, config), None)
