"""Every command behaves the same way: --version, help text on every flag, user errors as one line with
exit status 2, internal errors as one line (traceback behind --debug); flashmoe-run's input flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flashmoe

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
PROMPT = 'The "for" statement'


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    from flashmoe.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("demo") / "b8"
    convert_checkpoint(DEMO, out, bits=8, progress=False, log=lambda s: None)
    return out


def parsers():
    from flashmoe.convert.cli import build_parser
    from flashmoe.eval.cli import _parser as eval_parser
    from flashmoe.format.cli import _parser as inspect_parser
    from flashmoe.hub.cli import _publish_parser, _pull_parser
    from flashmoe.runtime.cli import _parser as run_parser

    return {"flashmoe-run": run_parser(), "flashmoe-convert": build_parser(), "flashmoe-inspect": inspect_parser(),
            "flashmoe-publish": _publish_parser(), "flashmoe-pull": _pull_parser(), "flashmoe-eval": eval_parser()}


MAINS = {
    "flashmoe-run": "flashmoe.runtime.cli:main", "flashmoe-convert": "flashmoe.convert.cli:main",
    "flashmoe-inspect": "flashmoe.format.cli:main", "flashmoe-publish": "flashmoe.hub.cli:publish_main",
    "flashmoe-pull": "flashmoe.hub.cli:pull_main", "flashmoe-eval": "flashmoe.eval.cli:main",
}


def _main(prog):
    import importlib

    mod, fn = MAINS[prog].split(":")
    return getattr(importlib.import_module(mod), fn)


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_version(prog, capsys):
    with pytest.raises(SystemExit) as e:
        _main(prog)(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {flashmoe.__version__}"


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_every_flag_has_help(prog):
    p = parsers()[prog]
    assert p.prog == prog
    missing = [a.option_strings or a.dest for a in p._actions if not a.help]
    assert not missing, f"{prog}: no help text for {missing}"
    assert any(a.dest == "debug" for a in p._actions)


def run(bundle, *argv, stdin=None, env=None, prog="flashmoe.runtime.cli"):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", prog, *([str(bundle)] if bundle else []), *map(str, argv)],
                          input=stdin, capture_output=True, env=e, timeout=120)


def one_line_error(r, prog="flashmoe-run"):
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert r.stdout == b""
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return err


def test_prompt_sources_agree(demo_bundle, tmp_path):
    """--prompt TEXT, --prompt - (stdin) and --prompt-file give the same greedy text."""
    base = ["--max-tokens", "12", "--no-chat-template"]
    a = run(demo_bundle, "--prompt", PROMPT, *base)
    b = run(demo_bundle, "--prompt", "-", *base, stdin=PROMPT.encode())
    f = tmp_path / "p.txt"
    f.write_text(PROMPT)
    c = run(demo_bundle, "--prompt-file", f, *base)
    assert a.returncode == b.returncode == c.returncode == 0, (a.stderr, b.stderr, c.stderr)
    assert a.stdout and a.stdout == b.stdout == c.stdout


def test_stop_is_repeatable_and_before_the_bundle(demo_bundle):
    """Each --stop takes one string and they add up; `--stop a --stop e BUNDLE` parses (nargs='+' ate it)."""
    from flashmoe.runtime.cli import _parser

    a = _parser().parse_args(["--stop", "a", "--stop", "e", str(demo_bundle), "--prompt", "x"])
    assert a.stop == ["a", "e"] and a.bundle == str(demo_bundle)
    free = run(demo_bundle, "--prompt", PROMPT, "--max-tokens", "30", "--no-chat-template").stdout.decode()
    letters = [ch for ch in free if not ch.isspace()]
    first, second = letters[0], next(ch for ch in letters if ch != letters[0])
    r = run(None, "--stop", first, "--stop", second, demo_bundle, "--prompt", PROMPT, "--max-tokens", "30",
            "--no-chat-template")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    cut = free[: min(free.index(first), free.index(second))]
    assert out == cut + ("" if cut.endswith("\n") else "\n")  # the text up to the stop, ending its line


@pytest.mark.parametrize("case", ["bad_utf8_arg", "bad_utf8_file", "bad_utf8_stdin", "empty_stdin", "no_file",
                                  "custom_kernels_on_cpu", "bogus_kernels_env", "system_without_template",
                                  "negative_max_tokens"])
def test_user_errors_exit_2(case, demo_bundle, tmp_path):
    import mlx.core as mx

    args, stdin, env = ["--prompt", "hello"], None, {}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    if case == "bad_utf8_arg":
        args = [b"--prompt", b"caf\xe9"]
    elif case == "bad_utf8_file":
        args = ["--prompt-file", bad]
    elif case == "bad_utf8_stdin":
        args, stdin = ["--prompt", "-"], b"\xff\xfe"
    elif case == "empty_stdin":
        args, stdin = ["--prompt", "-"], b"  \n"
    elif case == "no_file":
        args = ["--prompt-file", tmp_path / "missing.txt"]
    elif case == "custom_kernels_on_cpu":
        if mx.default_device() != mx.cpu:
            pytest.skip("MLX has a GPU here")
        args += ["--kernels", "custom"]
    elif case == "bogus_kernels_env":
        env = {"FLASHMOE_KERNELS": "bogus"}
    elif case == "system_without_template":
        args += ["--system-prompt", "be brief", "--no-chat-template"]
    elif case == "negative_max_tokens":
        args += ["--max-tokens", "-1"]
    r = subprocess.run([sys.executable, "-m", "flashmoe.runtime.cli", str(demo_bundle),
                        *[a if isinstance(a, bytes) else str(a) for a in args]],
                       input=stdin, capture_output=True, env={**os.environ, **env}, timeout=120)
    err = one_line_error(r)
    want = {"bad_utf8_arg": "UTF-8", "bad_utf8_file": "UTF-8", "bad_utf8_stdin": "UTF-8", "empty_stdin": "empty",
            "no_file": "no such file", "custom_kernels_on_cpu": "GPU", "bogus_kernels_env": "FLASHMOE_KERNELS",
            "system_without_template": "chat template", "negative_max_tokens": "--max-tokens"}[case]
    assert want in err


def test_internal_error_is_one_line_with_traceback_behind_debug(demo_bundle, monkeypatch, capsys):
    from flashmoe.runtime import cli, loader

    def boom(*a, **k):
        raise RuntimeError("synthetic bug")

    monkeypatch.setattr(loader, "load", boom)
    assert cli.main([str(demo_bundle), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: synthetic bug" in err and "--debug" in err
    assert cli.main([str(demo_bundle), "--prompt", "x", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["offline_env", "unreachable"])
def test_pull_offline_exits_2(how, tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "home")}
    env.update({"HF_HUB_OFFLINE": "1"} if how == "offline_env" else {"HF_ENDPOINT": "http://127.0.0.1:9"})
    r = subprocess.run([sys.executable, "-c", "import sys; from flashmoe.hub.cli import pull_main; "
                        f"sys.exit(pull_main(['someone/some-bundle', '-q', '-o', {str(tmp_path / 'out')!r}]))"],
                       capture_output=True, env={**os.environ, **env}, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"" and "Traceback" not in err, err
    # retry notices may come first; the error itself is the last line
    assert err.strip().splitlines()[-1].startswith("flashmoe-pull: error: ")


@pytest.mark.parametrize("prog,argv", [("flashmoe-inspect", ["MISSING"]), ("flashmoe-convert", ["MISSING", "-o", "OUT"]),
                                       ("flashmoe-eval", ["MISSING", "--text", "MISSING"]),
                                       ("flashmoe-publish", ["MISSING", "me/x"])])
def test_missing_inputs_exit_2(prog, argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [str(tmp_path / "nope") if a == "MISSING" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert _main(prog)(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err


def test_converter_needs_no_torch(tmp_path):
    """`make demo` installs no torch or transformers: the conversion must run without them."""
    code = ("import sys\n"
            "for m in ('torch', 'transformers'):\n"
            "    sys.modules[m] = None  # any import of them now fails\n"
            "from flashmoe.convert.cli import main\n"
            f"sys.exit(main([{str(DEMO)!r}, '-o', {str(tmp_path / 'b')!r}, '-q']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    model, tok = flashmoe.load(tmp_path / "b")
    assert model.config.num_experts >= 16


def test_prompt_from_stdin_at_a_terminal_says_so(demo_bundle, tmp_path):
    """`--prompt -` at a terminal prints a one-line hint on stderr that it reads to the end of input; the
    text typed then is the prompt (Ctrl-D ends it), and the answer ends its line."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "flashmoe.runtime.cli", str(demo_bundle), "--prompt", "-",
                                           "--max-tokens", "8", "--no-chat-template"],
                          env=dict(os.environ, HOME=str(tmp_path)), timeout=120, encoding="utf-8")
    try:
        child.expect_exact("flashmoe-run: reading the prompt from stdin until end of input (Ctrl-D)")
        child.send(PROMPT)
        child.sendeof()
        child.sendeof()  # the first only ends the line typed so far
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    assert child.before.endswith("\r\n")
    piped = run(demo_bundle, "--prompt", "-", "--max-tokens", "8", "--no-chat-template", stdin=PROMPT.encode())
    assert b"reading the prompt" not in piped.stderr  # not at a terminal: no hint
    assert piped.stdout.decode().strip() and piped.stdout.decode().strip() in child.before.replace("\r\n", "\n")


def test_shared_flags_build_the_configs():
    """flashmoe/cli.py's one flag vocabulary: runtime, engine and sampling flags parse into a RuntimeConfig
    (over the FLASHMOE_* environment, flags winning), an EngineConfig and a SamplingParams."""
    import argparse

    from flashmoe.cli import (add_engine_flags, add_runtime_flags, add_sampling_flags, engine_config_from_args,
                              runtime_config_from_args, sampling_params_from_args)
    from flashmoe.runtime.config import EngineConfig, RuntimeConfig

    p = argparse.ArgumentParser(prog="t")
    add_runtime_flags(p)
    add_engine_flags(p, max_batch=None, prompt_cache_gb=2.0)
    add_sampling_flags(p, max_tokens=64)
    a = p.parse_args(["--io", "direct", "--kernels", "builtin", "--gpu-cache-gb", "3", "--upload", "pinned",
                      "--dtype", "bfloat16", "--experts-per-token", "4", "--max-batch", "8",
                      "--memory-budget-gb", "1.5", "--temperature", "0.5", "--top-k", "5", "--seed", "3",
                      "--stop", "a", "--stop", "b"])
    assert runtime_config_from_args(a, environ={"FLASHMOE_KERNELS": "custom", "FLASHMOE_GPU_CACHE_GB": "9"}) == \
        RuntimeConfig(io="direct", kernels="builtin", gpu_cache_gb=3.0, upload="pinned", dtype="bfloat16",
                      experts_per_token=4)
    assert engine_config_from_args(a) == EngineConfig(max_batch=8, memory_budget_gb=1.5, prompt_cache_gb=2.0)
    s = sampling_params_from_args(a)
    assert (s.max_tokens, s.temperature, s.top_k, s.seed, s.stop) == (64, 0.5, 5, 3, ("a", "b"))
    d = p.parse_args(["--max-batch", "auto"])
    assert runtime_config_from_args(d, environ={"FLASHMOE_KERNELS": "custom"}).kernels == "custom"
    assert engine_config_from_args(d).max_batch is None and sampling_params_from_args(d).max_tokens == 64
    for bad in (["--max-batch", "0"], ["--max-batch", "x"], ["--io", "odirect"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == 2
    with pytest.raises(flashmoe.format.InputError, match="top-p"):
        sampling_params_from_args(p.parse_args(["--top-p", "0"]))
