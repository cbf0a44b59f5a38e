"""flashmoe-run's chat: driven through a pseudo-terminal the way a person uses it (paste, Ctrl-C mid-reply,
another turn that reuses the cache, /reset, Ctrl-D), and its conversation bookkeeping on its own."""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import time
from pathlib import Path

import pytest

import flashmoe

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    from flashmoe.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("demo") / "b8"
    convert_checkpoint(DEMO, out, bits=8, progress=False, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def demo(demo_bundle):
    return flashmoe.load(demo_bundle)


def suffix_ids(tok, user: str) -> list[int]:
    """What a later turn must prefill: the end of the last reply and the new user turn (demo template)."""
    return tok.encode(f"<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def _args(bundle, **kw):
    a = dict(bundle=str(bundle), system_prompt=None, no_chat_template=False, max_tokens=24, temperature=0.0,
             top_p=1.0, top_k=0, seed=None, stop=None, stats=False)
    a.update(kw)
    return argparse.Namespace(**a)


# ----------------------------------------------------------------------------------------------
# through a pseudo-terminal


def test_chat_in_a_terminal(demo_bundle, demo, tmp_path):
    """Raw mode (no template), so a reply never ends early and Ctrl-C surely lands mid-reply. --stats
    prints each turn's figures, ending with "cache: N tokens", which marks the end of a reply."""
    pexpect = pytest.importorskip("pexpect")
    _, tok = demo
    env = dict(os.environ, HOME=str(tmp_path), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(sys.executable, ["-m", "flashmoe.runtime.cli", str(demo_bundle), "--no-chat-template",
                                           "--max-tokens", "400", "--stats"],
                          env=env, timeout=120, dimensions=(40, 200), encoding="utf-8")
    done = r"cache: +(\d+) tokens of"
    try:
        child.expect_exact(">>>")
        # /help is answered by the chat, not sent to the model
        child.send("/help\r")
        child.expect_exact("/reset")
        child.expect_exact(">>>")

        # a multi-line paste (bracketed paste, as terminals send it) is one message
        paste = 'The "for" statement\nThe "while" statement'
        child.send(f"\x1b[200~{paste}\x1b[201~")
        child.send("\r")
        child.expect(r"prefill: (\d+) new tokens in [\d.]+ s \((\d+) from the cache\)")
        assert int(child.match.group(1)) == len(tok.encode(paste + "\n")) and child.match.group(2) == "0"
        child.expect(done)
        held = int(child.match.group(1))
        child.expect_exact(">>>")

        # Ctrl-C mid-reply stops the reply and keeps the session
        child.send("The standard type hierarchy\r")
        time.sleep(1.0)  # a 400-token reply takes several seconds here
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(">>>")

        # the next turn prefills only its own tokens: the conversation so far stayed in the cache
        child.send("thanks\r")
        child.expect(r"prefill: (\d+) new tokens in [\d.]+ s \((\d+) from the cache\)")
        assert int(child.match.group(1)) == len(tok.encode("\nthanks\n"))
        assert int(child.match.group(2)) > held
        child.expect(done)
        child.expect_exact(">>>")

        # /reset asks first; "n" keeps, "y" clears
        child.send("/reset\r")
        child.expect_exact("[y/N]")
        child.send("n\r")
        child.expect_exact("kept the conversation")
        child.send("/reset\r")
        child.expect_exact("[y/N]")
        child.send("y\r")
        child.expect_exact("conversation cleared")
        child.send("/stats\r")
        child.expect_exact("no reply yet; 0 tokens in the cache")

        # Ctrl-D leaves cleanly
        child.expect_exact(">>>")
        child.sendcontrol("d")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


# ----------------------------------------------------------------------------------------------
# bookkeeping, without a terminal


def run_chat(demo, bundle, script: str, **kw) -> tuple[str, str, object]:
    from flashmoe.runtime.chat import Chat, LineReader

    model, tok = demo
    out, err = io.StringIO(), io.StringIO()
    chat = Chat(model, tok, _args(bundle, **kw), out=out, err=err)
    old = sys.stdin
    sys.stdin = io.StringIO(script)
    try:
        chat.run(LineReader(tty=False))
    finally:
        sys.stdin = old
    return out.getvalue(), err.getvalue(), chat


def test_fenced_block_is_one_message(demo, demo_bundle):
    out, err, chat = run_chat(demo, demo_bundle, '"""\nline one\n\nline three\n"""\n/stats\n')
    _, tok = demo
    want = tok.encode(tok.apply_chat_template([{"role": "user", "content": "line one\n\nline three"}]))
    assert f"prefill: {len(want)} new tokens" in err
    assert chat.conv.turns == 1


def test_cache_survives_replies_that_do_not_retokenize(demo, demo_bundle):
    """The conversation is kept as the generated ids; a reply whose text would tokenize differently
    still leaves the cache usable, and the next turn prefills only the new template suffix."""
    from flashmoe.runtime.chat import Chat
    from flashmoe.runtime.generate import generate

    model, tok = demo
    chat = Chat(model, tok, _args(demo_bundle), out=io.StringIO(), err=io.StringIO())
    conv = chat.conv
    ids = conv.prompt_ids("Tell me about the \"for\" statement.")
    # a reply spelled byte by byte: valid text, but not the ids the tokenizer would choose for it
    word = " statement"
    odd = [tok.token_to_id(ch) for ch in "Ġstatement"]
    assert None not in odd and tok.encode(word) != odd and tok.decode(odd) == word
    list(generate(model, tok, ids + odd, max_tokens=0, session=conv.session))  # cache: prompt + odd reply
    conv.ids = ids + odd
    chat.reply("thanks")
    assert chat.last["cached"] == len(ids) + len(odd)
    assert chat.last["new"] == len(suffix_ids(tok, "thanks"))
    # the same turn from scratch gives the same greedy reply
    fresh = [c.token for c in generate(model, tok, ids + odd + suffix_ids(tok, "thanks"), max_tokens=24)
             if c.token is not None]
    assert chat.conv.ids[len(ids) + len(odd) + len(suffix_ids(tok, "thanks")):] == fresh


def test_system_prompt_and_commands(demo, demo_bundle):
    out, err, chat = run_chat(demo, demo_bundle, "/system\n/system Answer briefly.\n/system\n/nope\nhello\n/exit\n",
                              system_prompt="Be kind.")
    assert "system prompt: 'Be kind.'" in err and "system prompt set" in err
    assert "system prompt: 'Answer briefly.'" in err
    assert "unknown command /nope" in err
    _, tok = demo
    want = tok.encode(tok.apply_chat_template([{"role": "system", "content": "Answer briefly."},
                                               {"role": "user", "content": "hello"}]))
    assert chat.conv.ids[: len(want)] == want and chat.conv.turns == 1


def test_long_prompt_shows_prefill_progress(demo, demo_bundle):
    from flashmoe.runtime import chat as chat_mod

    text = (ROOT / "demo" / "heldout.txt").read_text()[:2400].replace('"""', "'''")
    _, tok = demo
    assert len(tok.encode(text)) > chat_mod.PROGRESS_MIN
    out, err, chat = run_chat(demo, demo_bundle, '"""' + text + '\n"""\n/stats\n')
    assert re.search(r"prefill \d+/\d+ tokens \(\d+%\)", err)
    n = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": text.strip(chr(10))}])))
    assert f"prefill: {n} new tokens" in err
    assert len(chat.conv.session.longest()) >= n


def test_a_script_is_not_asked_to_confirm(demo, demo_bundle):
    """With stdin not a terminal, /system and /reset go ahead without a "[y/N]" question (which would
    read the script's next line as the answer)."""
    out, err, chat = run_chat(demo, demo_bundle, "hello\n/system Answer briefly.\nagain\n/reset\n/stats\n")
    assert "[y/N]" not in err
    assert "system prompt set" in err and "the conversation starts over" in err
    assert "conversation cleared" in err and "no reply yet; 0 tokens in the cache" in err
    assert chat.conv.turns == 0
