"""One model across several processes or machines with `mx.distributed` (expert parallel).

    mlx.launch --hosts 10.0.0.1,10.0.0.2 flashmoe-run BUNDLE --prompt "..."

Every rank loads the same bundle (dense weights replicated) and owns the routed experts e with
e % size == rank: it reads and applies only those, and after each MoE layer the ranks add their partial
outputs with `all_sum` (runtime/experts.py; the shared expert is applied once, after the sum). So each
rank reads 1/size of the expert bytes from its own disk and caches 1/size of the model.

Rank 0 (the leader) owns tokenization, sampling and output. The other ranks (followers) run no front
end: they mirror the engine's model steps (runtime/runner.py: prefill, decode, rows leaving, reset,
prompt-cache stores and clears), in the same order, told by a *plan* that the leader broadcasts before each step. A
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
`dist.attach(model)`, then on every rank `engine = make_engine(dist, model, tokenizer, engine_config)` and
`run_engine(dist, engine, body)`: rank 0 runs body(engine), the others follow (flashmoe-run, -batch,
-serve); `follow_engine(...)` does a follower's whole part.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from flashmoe.errors import BundleError

from .config import EngineConfig
from .dist_checks import bundle_digest, bundle_part_problem
from .dist_link import (DEFAULT_TIMEOUT_S, LOAD_TIMEOUT_S, DistributedError, Leader, Link, Watchdog,
                        follow)
from .engine import Engine
from .experts import ExpertShard
from .runner import PREFILL_TOKENS, BatchRunner, PromptCache


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

    def attach(self, model) -> None:
        """After loading `model` with shard=self.expert_shard(): check that it was (a model holding every
        expert would skip the ranks' sums and leave them waiting), then wait for every rank to have loaded.
        Loading takes as long as each host's disk needs, so this wait has a bound of its own
        (LOAD_TIMEOUT_S). Nothing is changed on the model."""
        if self.size == 1:
            return
        shard = model.experts.shard
        if shard is None or (shard.rank, shard.size) != (self.rank, self.size):
            raise DistributedError(f"rank {self.rank}: the model was loaded without this rank's expert shard; "
                                   "load it with flashmoe.load(..., shard=dist.expert_shard())")
        self.link.gather([1], "waiting for every rank to load the bundle", max(self.timeout, LOAD_TIMEOUT_S))


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

    def forget(self):
        return self.runner.forget()


class LeaderRunner:
    """Rank 0's runner: the BatchRunner interface the Engine drives, each model step broadcast to the
    followers and then run here. Steps are never pipelined (`pipelined` is False), so a launched step is
    always finished and never cancelled; `finish` only syncs it here."""

    pipelined = False

    def __init__(self, runner: BatchRunner, leader: Leader):
        self.local = runner
        self.leader = leader

    @property
    def rows(self) -> list[int]:
        return self.local.rows

    @property
    def cache(self):
        return self.local.cache

    @property
    def prompt_cache(self):
        return self.local.prompt_cache

    @property
    def prefill_tokens(self) -> int:
        return self.local.prefill_tokens

    def cache_bytes(self) -> int:
        return self.local.cache_bytes()

    def prefill_passes(self, rows_tokens: list[int]) -> int:
        return self.local.prefill_passes(rows_tokens)

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

    def forget(self) -> None:
        self.leader.call("forget")


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
    dist.attach(model)
    config = EngineConfig(**{k: v for k, v in (engine_kw or {}).items() if v is not None})
    return run_engine(dist, make_engine(dist, model, tokenizer, config), None)
