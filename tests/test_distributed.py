"""Expert-parallel ranks (runtime/distributed.py) over mx.distributed's `ring` backend on loopback.

Ranks are real processes: started with `mlx.launch -n N` (what users run), or, where a test must kill
one rank without the launcher stopping the others for us, the way mlx.launch starts them (MLX_RANK and
a ring hostfile per process). This file is also the worker those processes run:

    python tests/test_distributed.py BUNDLE OUT MODE PROMPT MAX_TOKENS

MODE "once": generate once (greedy), then every rank writes OUT.RANK.json with its expert reads (and rank 0
the tokens); MODE "loop": rank 0 generates again and again, printing a line per round, until killed;
MODE "engine": three prompts batched on the engine; MODE "fail": the same after a step that failed on rank 0
(every rank also writes the rows its runner holds at the end).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_hub import hf_env, hub  # noqa: F401  (fixtures: a Hub server on 127.0.0.1)

# huggingface_hub's uploads (the Hub test server) pass data= to httpx2, which it deprecates (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
HERE = Path(__file__).resolve()
PROMPT = "The quick brown fox"
LONG_PROMPT = ("A journey of a thousand miles begins with a single step. To be or not to be, that is the question. "
               "All that glitters is not gold. The early bird catches the worm, but the second mouse gets ") * 2
ENGINE_PROMPTS = [PROMPT, "To be or not to be", LONG_PROMPT]
SLOTS = 64  # the tiny model's 4 layers x 16 experts: every record stays resident, so reads are exact counts


# ----------------------------------------------------------------------------------------------
# the worker (what each rank runs)


def _worker(argv: list[str]) -> int:
    from flashmoe.errors import FlashmoeError
    from flashmoe.runtime import distributed as D
    from flashmoe.runtime.config import EngineConfig
    from flashmoe.runtime.generate import generate, prompt_ids
    from flashmoe.runtime.sampling import SamplingParams

    import flashmoe

    bundle, out, mode, prompt, n = argv[0], argv[1], argv[2], argv[3], int(argv[4])
    try:
        dist = D.start_from_env("worker")
        bundle = bundle.replace("{rank}", str(dist.rank))  # a part per rank (flashmoe-pull --shard)
        dist.check_bundle(bundle)
        model, tok = flashmoe.load(bundle, slots=SLOTS, shard=dist.expert_shard())
        dist.attach(model)
        res: dict = {}
        if mode in ("engine", "fail"):  # the batched engine: three prompts of different lengths decoded together
            engine = D.make_engine(dist, model, tok, EngineConfig(max_batch=4, memory_budget_gb=1.0))

            def run_all(engine):
                sids = [engine.add(prompt_ids(tok, p, chat_template=False), SamplingParams(max_tokens=n))
                        for p in ENGINE_PROMPTS]
                done = {}
                while engine.has_work():
                    for ev in engine.step():
                        if ev.finish_reason is not None:
                            done[ev.seq_id] = ev.tokens
                return [done[s] for s in sids]

            def run(engine):
                if mode == "fail":  # a step that fails on rank 0 after the ranks ran its forwards
                    def broken(ids, logits):
                        raise RuntimeError("injected failure")

                    for p in ENGINE_PROMPTS[:2]:
                        engine.add(prompt_ids(tok, p, chat_template=False),
                                   SamplingParams(max_tokens=n, logits_processor=broken))
                    try:
                        engine.step()
                    except RuntimeError as e:
                        res["failed"] = str(e)
                res["tokens"] = run_all(engine)

            D.run_engine(dist, engine, run)
            res["rows"] = list(engine.runner.rows)  # every rank: nothing left of the failed batch
            res["cache"] = engine.runner.cache is not None
            return _dump(out, dist, model, res)

        engine = D.make_engine(dist, model, tok, EngineConfig(max_batch=1, prefill_tokens=1024))

        def body(engine):
            rounds = 0
            while True:
                res["tokens"] = [c.token for c in generate(model, tok, prompt, max_tokens=n, chat_template=False,
                                                           engine=engine) if c.token is not None]
                rounds += 1
                print(f"round {rounds}", flush=True)
                if mode == "once":
                    return

        D.run_engine(dist, engine, body)
    except FlashmoeError as e:
        print(f"worker: error: {e}", file=sys.stderr, flush=True)
        return 2
    return _dump(out, dist, model, res)


def _dump(out, dist, model, res: dict) -> int:
    res["reads"] = sorted([layer, e, c] for (layer, e), c in model.experts.reads.items())
    Path(f"{out}.{dist.rank}.json").write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------------------------
# starting ranks


def _free_base(n: int) -> int:
    """A port p with p .. p+n-1 free on 127.0.0.1 (ring listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    env.update(extra)
    return env


def mlx_launch(n: int, cmd: list[str], timeout: float = 120, **env) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()",
              "-n", str(n), "-p", str(_free_base(n)), "--backend", "ring", "--"]
    return subprocess.run(launch + cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env), check=False)


def start_ranks(n: int, cmd: list[str], tmp: Path, **env) -> list[subprocess.Popen]:
    """Start n ranks as mlx.launch does on one host (MLX_RANK, a ring hostfile), without its supervision."""
    base = _free_base(n)
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(n)]))
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile), **env)) for r in range(n)]


def worker_cmd(bundle, out, mode: str, prompt: str = PROMPT, n: int = 12) -> list[str]:
    return [sys.executable, str(HERE), str(bundle), str(out), mode, prompt, str(n)]


# ----------------------------------------------------------------------------------------------
# the single-process reference


@pytest.fixture(scope="module")
def reference(bundles):
    """Greedy tokens and expert reads of one process, per prompt."""
    from flashmoe.runtime.generate import generate

    import flashmoe

    model, tok = flashmoe.load(bundles[8], slots=SLOTS)
    out = {}
    for prompt in ENGINE_PROMPTS:
        model.experts.clear_cache()  # every run starts with no record resident, as a fresh process does
        model.experts.reads.clear()
        toks = [c.token for c in generate(model, tok, prompt, max_tokens=12, chat_template=False) if c.token is not None]
        out[prompt] = (toks, dict(model.experts.reads))
    return out


# ----------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("n,prompt", [(2, PROMPT), (3, LONG_PROMPT)], ids=["2-ranks", "3-ranks-long-prompt"])
def test_ranks_match_single_process_and_read_only_their_share(bundles, reference, tmp_path, n, prompt):
    r = mlx_launch(n, worker_cmd(bundles[8], tmp_path / "out", "once", prompt))
    assert "error" not in r.stderr, r.stderr  # (mlx.launch itself exits 0 whatever the ranks do)
    want_tokens, want_reads = reference[prompt]
    got = [json.loads((tmp_path / f"out.{rank}.json").read_text()) for rank in range(n)]
    assert got[0]["tokens"] == want_tokens  # token for token
    assert len(want_tokens) == 12
    for rank in range(n):
        reads = {(layer, e): c for layer, e, c in got[rank]["reads"]}
        # exactly this rank's share: every record it owns that the run needed, once, and nothing else
        assert reads == {k: c for k, c in want_reads.items() if k[1] % n == rank}, rank


def test_batched_engine_on_two_ranks_matches_single_process(bundles, reference, tmp_path):
    r = mlx_launch(2, worker_cmd(bundles[8], tmp_path / "out", "engine"))
    assert "error" not in r.stderr, r.stderr
    got = [json.loads((tmp_path / f"out.{rank}.json").read_text()) for rank in range(2)]
    assert got[0]["tokens"] == [reference[p][0] for p in ENGINE_PROMPTS]
    for rank in range(2):
        assert got[rank]["reads"] and all(e % 2 == rank for _, e, _ in got[rank]["reads"])


def test_a_failed_step_resets_every_rank_and_the_next_request_works(bundles, reference, tmp_path):
    """A step that fails on rank 0 (here its sampler raises, after every rank ran the prefill) drops the
    batch on every rank: rank 0's engine resets its runner, which tells the followers to reset theirs.
    The next requests then run as in one process, and no rank holds a row of the failed batch."""
    r = mlx_launch(2, worker_cmd(bundles[8], tmp_path / "out", "fail"))
    assert "error" not in r.stderr, r.stderr
    got = [json.loads((tmp_path / f"out.{rank}.json").read_text()) for rank in range(2)]
    assert got[0]["failed"] == "injected failure"
    assert got[0]["tokens"] == [reference[p][0] for p in ENGINE_PROMPTS]
    for rank in range(2):
        assert got[rank]["rows"] == [] and got[rank]["cache"] is False, rank


def test_flashmoe_run_on_two_ranks_prints_the_single_process_text(bundles):
    args = ["flashmoe-run", str(bundles[8]), "--prompt", PROMPT, "--max-tokens", "12", "--no-chat-template"]
    one = subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env(), check=False)
    assert one.returncode == 0, one.stderr
    two = mlx_launch(2, args)
    assert "error" not in two.stderr, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()  # rank 0 alone prints, the same text


def test_flashmoe_batch_on_two_ranks_writes_the_single_process_answers(bundles, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(ENGINE_PROMPTS)))
    answers = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}.jsonl"
        cmd = ["flashmoe-batch", str(bundles[8]), str(inp), "-o", str(out), "--max-tokens", "8", "-q"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), check=False) if n == 1 else mlx_launch(n, cmd)
        assert "error" not in r.stderr, r.stderr
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        answers[n] = sorted((rec["custom_id"], json.dumps(rec["response"]["body"]["choices"])) for rec in recs)
    assert len(answers[1]) == 3 and answers[2] == answers[1]


def test_flashmoe_serve_on_two_ranks_answers_as_one_process(bundles):
    """flashmoe-serve under mlx.launch: rank 0 serves HTTP, rank 1 mirrors; the same completion as one process."""
    pytest.importorskip("uvicorn")
    import httpx

    def serve_and_ask(n: int) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = ["flashmoe-serve", str(bundles[8]), "--port", str(port)]
        if n > 1:
            cmd = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "-n", str(n),
                   "-p", str(_free_base(n)), "--backend", "ring", "--", *cmd]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                             start_new_session=True)
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 90:
                try:
                    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
                        "model": bundles[8].name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
                    return r.json()["choices"][0]["text"]
                except httpx.TransportError:
                    assert p.poll() is None, p.stderr.read()
                    time.sleep(0.3)
            raise AssertionError("the server did not answer in 90 s")
        finally:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    one = serve_and_ask(1)
    assert one and serve_and_ask(2) == one


def _wait_rounds(p: subprocess.Popen, rounds: int, timeout: float = 90) -> None:
    t0 = time.monotonic()
    seen = 0
    while seen < rounds:
        line = p.stdout.readline()
        assert line, f"rank 0 ended early: {p.stderr.read()}"
        seen += line.startswith("round")
        assert time.monotonic() - t0 < timeout


def _reap(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int | None, str, float]]:
    """(return code, stderr, seconds) of each process, waiting at most `timeout` in all."""
    t0 = time.monotonic()
    out = []
    for p in procs:
        try:
            p.wait(max(0.1, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            pass
        out.append((p.returncode, p.stderr.read() if p.returncode is not None else "", time.monotonic() - t0))
    for p in procs:
        if p.returncode is None:
            p.kill()
            p.wait()
    return out


def test_killed_rank_ends_the_others_with_an_error(bundles, tmp_path):
    procs = start_ranks(3, worker_cmd(bundles[8], tmp_path / "out", "loop", n=40), tmp_path)
    try:
        _wait_rounds(procs[0], 2)
        procs[1].kill()  # mid-run: rank 0 is generating
        t0 = time.monotonic()
        res = _reap([procs[0], procs[2]], timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rc, err, _ in res:
        assert rc not in (None, 0), "a rank kept running after another died"
        assert "error: rank" in err and ("lost the connection" in err or "no answer" in err), err
    assert time.monotonic() - t0 < 30


def test_hung_rank_ends_the_others_by_the_watchdog(bundles, tmp_path):
    procs = start_ranks(2, worker_cmd(bundles[8], tmp_path / "out", "loop", n=40), tmp_path,
                        FLASHMOE_DIST_TIMEOUT="4")
    try:
        _wait_rounds(procs[0], 2)
        os.kill(procs[1].pid, signal.SIGSTOP)  # hangs without closing its sockets, like a host gone dark
        t0 = time.monotonic()
        (rc, err, _), = _reap([procs[0]], timeout=30)
        took = time.monotonic() - t0
    finally:
        os.kill(procs[1].pid, signal.SIGKILL)
        for p in procs:
            p.kill()
            p.wait()
    assert rc == 2 and "rank 0: no answer from the other ranks for 4 s" in err, err
    assert took < 30


def test_ranks_on_different_conversions_refuse(bundles, tmp_path):
    """Rank 1 gets the 4-bit bundle, rank 0 the 8-bit one: both stop at start, naming rank 1."""
    base = _free_base(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    procs = [subprocess.Popen(worker_cmd(bundles[bits], tmp_path / "out", "once"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)))
             for r, bits in ((0, 8), (1, 4))]
    res = _reap(procs, timeout=60)
    for rc, err, _ in res:
        assert rc == 2 and "rank(s) 1 run a different bundle" in err, err


def test_rank_missing_its_part_names_rank_file_and_fix(bundles, tmp_path):
    """A sharded copy made for rank 0 given to rank 1: rank 1 says what to pull; rank 0 names rank 1."""
    import hashlib
    import shutil

    part = tmp_path / "part0"
    shutil.copytree(bundles[8], part)
    sha = hashlib.sha256((part / "flashmoe.json").read_bytes()).hexdigest()
    (part / ".flashmoe-shard.json").write_text(json.dumps({"rank": 0, "size": 2, "manifest_sha256": sha}))
    (rc0, err0, _), (rc1, err1, _) = _reap(start_ranks(2, worker_cmd(part, tmp_path / "out", "once"), tmp_path), 60)
    assert rc1 == 2 and (f"rank 1 of 2: {part} holds the experts of shard 0/2, not this rank's; on this host run "
                         "`flashmoe-pull REPO --shard 1/2 -o DIR`") in err1
    assert rc0 == 2 and "rank 0: rank(s) 1 lack their part of the bundle" in err0
    # and a layer file missing from a rank's own part names that file
    (part / "experts" / "layer-002.bin").unlink()
    from flashmoe.runtime.dist_checks import bundle_part_problem
    from flashmoe.runtime.experts import ExpertShard as Shard

    msg = bundle_part_problem(part, Shard(0, 2))
    assert msg.startswith(f"rank 0 of 2: {part / 'experts' / 'layer-002.bin'} is missing; on this host run "
                          "`flashmoe-pull REPO --shard 0/2 -o DIR`")


def test_pull_shard_fetches_only_its_records_and_the_parts_run_together(bundles, reference, hub, tmp_path):  # noqa: F811
    """flashmoe-pull --shard r/2 from a Hub (tests/hubserver.py): each part holds the dense files and only its
    own records (others are holes), re-pulling fetches nothing, and the two parts run as two ranks."""
    import shutil
    from collections import Counter

    from flashmoe.format.manifest import MANIFEST, expert_path, write_json_atomic
    from flashmoe.format.experts import file_record_digests
    from flashmoe.hub.shard import pull_shard
    from test_hub import REPO, publish

    src = tmp_path / "src"
    shutil.copytree(bundles[8], src)
    m = json.loads((src / MANIFEST).read_text())
    L, E = m["config"]["num_hidden_layers"], m["experts"]["num_experts"]
    m["records"] = {"algorithm": "crc32", "digests": [file_record_digests(src / expert_path(i)) for i in range(L)]}
    write_json_atomic(src / MANIFEST, m)  # as the converter writes it (the fixture bundle predates records)
    publish(src)

    def record_gets():
        return Counter(p.split("/resolve/")[1].split("/", 1)[1] for meth, p in hub.state.requests
                       if meth == "GET" and "/resolve/" in p and "/experts/" in p)

    before = record_gets()
    parts = [pull_shard(REPO, r, 2, tmp_path / f"part{r}", token=False, progress=False) for r in range(2)]
    gets = record_gets() - before
    stride, off0 = m["experts"]["record_stride"], m["experts"]["data_offset"]
    for i in range(L):
        rel = expert_path(i)
        assert gets[rel] == 2 + E  # a header per part, then each record exactly once over both parts
        whole = (src / rel).read_bytes()
        for r, part in enumerate(parts):
            got = (part / rel).read_bytes()
            assert len(got) == len(whole) and got[:off0] == whole[:off0]
            for e in range(E):
                rec = slice(off0 + e * stride, off0 + (e + 1) * stride)
                assert got[rec] == (whole[rec] if e % 2 == r else bytes(stride)), (rel, r, e)
    for f in ("flashmoe.json", "dense/global.safetensors", "tokenizer.json"):
        assert (parts[1] / f).read_bytes() == (src / f).read_bytes()

    before = record_gets()
    pull_shard(REPO, 0, 2, parts[0], token=False, progress=False)  # complete: only the headers again
    assert sum((record_gets() - before).values()) == L

    r = mlx_launch(2, worker_cmd(str(tmp_path / "part{rank}"), tmp_path / "out", "once"))
    assert "error" not in r.stderr, r.stderr
    assert json.loads((tmp_path / "out.0.json").read_text())["tokens"] == reference[PROMPT][0]

    # a record that is corrupt on the Hub: named, and the pull fails
    sha = next(f["sha256"] for f in m["files"] if f["path"] == expert_path(0))
    blob = Path(os.path.realpath(hub.state.store.path(sha)))
    data = bytearray(blob.read_bytes())
    data[off0 + 2 * stride + 5] ^= 0xFF  # expert 2 of layer 0: rank 0's
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    from flashmoe.hub.common import HubError

    with pytest.raises(HubError, match="experts/layer-000.bin: expert 2 is still wrong after 3 downloads"):
        pull_shard(REPO, 0, 2, tmp_path / "bad", token=False, progress=False)
    assert not (tmp_path / "bad" / ".flashmoe-shard.json").exists()


@pytest.mark.parametrize("argv,msg", [
    (["--shard", "2/2", "-o", "d"], "--shard '2/2': the rank must be in 0..RANKS-1"),
    (["--shard", "one", "-o", "d"], "--shard 'one': give RANK/RANKS"),
    (["--shard", "1/2"], "--shard needs -o DIR"),
])
def test_pull_shard_flag_errors(capsys, argv, msg):
    from flashmoe.hub.cli import pull_main

    assert pull_main(["someone/repo", *argv]) == 2
    assert f"flashmoe-pull: error: {msg}" in capsys.readouterr().err


def test_single_process_is_unchanged():
    """Without a launcher: a group of one, no watchdog, no link, no expert shard; attach does nothing."""
    from flashmoe.runtime import distributed as D

    dist = D.start_from_env("t", environ={})
    assert (dist.rank, dist.size, dist.watchdog, dist.link) == (0, 1, None, None)
    assert dist.expert_shard() is None
    dist.attach(None)
    with pytest.raises(D.DistributedError, match="FLASHMOE_DIST_TIMEOUT='x'"):
        D.start_from_env("t", environ={"FLASHMOE_DIST_TIMEOUT": "x"})


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
