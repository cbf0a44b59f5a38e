"""The interactive chat of flashmoe-run (no --prompt): line editing and history, multi-line input, replies
that Ctrl-C stops without losing the conversation, and a cache that carries every earlier turn.

The conversation is kept as token ids, not text: each turn's prompt is (every token of the conversation
so far, the generated ones as generated) + (the tokens of the chat template's text between the last
reply and the next reply). So the cache keeps working when a reply does not re-tokenize to the ids the
model produced, and when the template would render earlier turns differently (e.g. dropping thinking).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from flashmoe.cli import sampling_params_from_args
from flashmoe.errors import FlashmoeError, InputError

from .config import EngineConfig
from .engine import Engine
from .generate import PREFILL_CHUNK as GENERATE_CHUNK
from .generate import generate
from .runner import PromptCache
from .report import fmt_stats

PROMPT, MORE = ">>> ", "... "
FENCE = '"""'
PREFILL_CHUNK = 512  # tokens per forward when the chat prefills a long prompt itself (with a progress line)
PROGRESS_MIN = 512  # new tokens from which a turn shows prefill progress
REPLY = "\x00flashmoe-reply\x00"  # stands for a reply's text when rendering the template around it
HISTORY = Path.home() / ".cache" / "flashmoe" / "chat_history"

HELP = f"""commands:
  /help            this list
  /reset           clear the conversation (asks first)
  /system [TEXT]   show the system prompt, or set it (the conversation starts over); /system off clears it
  /stats           the last reply's prefill and decode figures, and the tokens in the cache
  /exit, /quit     leave (or Ctrl-D)
input:
  Enter sends. Pasted text with several lines is one message. {FENCE} on a line of its own starts a
  multi-line message and another {FENCE} ends it. Up/Down walk the history (in a terminal).
  Ctrl-C stops a reply and keeps the conversation; at the prompt it clears the line."""


class Conversation:
    """Token ids of the conversation, its messages and the prompt cache (`session`) holding their state."""

    def __init__(self, tok, system: str | None = None, template: bool = True, session: PromptCache | None = None):
        self.tok = tok
        self.template = template and tok.chat_template is not None
        self.system = system
        self.session = session if session is not None else PromptCache()
        self.ids: list[int] = []  # every token of the conversation so far, replies as generated
        self.turns = 0

    def reset(self) -> None:
        """Start the conversation over (the caller empties the prompt cache: Chat.start_over)."""
        self.ids, self.turns = [], 0

    def _system(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids the model sees before its next reply, if the user says `text`."""
        if not self.template:
            return self.ids + self.tok.encode(("\n" if self.ids else "") + text + "\n")
        if not self.ids:
            msgs = self._system() + [{"role": "user", "content": text}]
            return self.tok.encode(self.tok.apply_chat_template(msgs, add_generation_prompt=True))
        # the template's text after an assistant reply's content, up to the next reply's start
        probe = self._system() + [{"role": "user", "content": "?"}, {"role": "assistant", "content": REPLY},
                                  {"role": "user", "content": text}]
        rendered = self.tok.apply_chat_template(probe, add_generation_prompt=True)
        i = rendered.find(REPLY)
        if i < 0:
            raise InputError("the chat template drops earlier replies, so a conversation cannot continue; "
                             "use --prompt for single questions")
        return self.ids + self.tok.encode(rendered[i + len(REPLY):])


class Interrupt:
    """While active, the first Ctrl-C sets a flag (the reply stops at the next token); a second one
    raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        self.hit = False
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
        return False


class LineReader:
    """prompt_toolkit line editing and history on a terminal; plain lines otherwise (pipes, files)."""

    def __init__(self, tty: bool):
        self.ps = None
        if tty:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory, InMemoryHistory

            try:
                HISTORY.parent.mkdir(parents=True, exist_ok=True)
                history = FileHistory(str(HISTORY))
            except OSError:
                history = InMemoryHistory()
            self.ps = PromptSession(history=history)

    def read(self, prompt: str) -> str:
        """One line (a paste may hold several); EOFError on Ctrl-D / end of input."""
        if self.ps is not None:
            return self.ps.prompt(prompt)
        sys.stderr.write(prompt)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def message(self) -> str:
        """A whole message: a line, or a {FENCE} block over several lines."""
        text = self.read(PROMPT)
        if not text.strip().startswith(FENCE):
            return text
        body = text.strip()[len(FENCE):]
        while not body.rstrip().endswith(FENCE):
            body += "\n" + self.read(MORE)
        return body.rstrip()[: -len(FENCE)].strip("\n")


def prefill(engine: Engine, ids: list[int], stop: Interrupt | None = None, err=None) -> None:
    """Feed `ids` into the engine's prompt cache chunk by chunk with a progress line, stopping between
    chunks on Ctrl-C (the cache then holds what was fed)."""
    err = err or sys.stderr
    pc = engine.prompt_cache
    if pc.holds(ids):
        return
    start = pc.prefix(ids)
    total = len(ids) - start
    for end in range(start + PREFILL_CHUNK, len(ids) + PREFILL_CHUNK, PREFILL_CHUNK):
        engine.runner.store(ids[: min(end, len(ids))])
        done = min(end, len(ids)) - start
        err.write(f"\rprefill {done}/{total} tokens ({100 * done // max(total, 1)}%)")
        err.flush()
        if stop is not None and stop.hit:
            break
    err.write("\r\033[K")
    err.flush()


class Chat:
    """The chat loop over an Engine (by default a one-sequence engine of `model` with an unbounded prompt
    cache; flashmoe-run under mlx.launch passes the leader's)."""

    def __init__(self, model, tok, args, out=None, err=None, engine: Engine | None = None):
        self.model, self.tok, self.args = model, tok, args
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.engine = engine or Engine(model, tok, EngineConfig(max_batch=1, prefill_tokens=GENERATE_CHUNK),
                                       prompt_cache=PromptCache())
        self.conv = Conversation(tok, args.system_prompt, template=not args.no_chat_template,
                                 session=self.engine.prompt_cache)
        self.last: dict | None = None  # figures of the last reply

    def say(self, msg: str) -> None:
        print(msg, file=self.err, flush=True)

    # ---- one reply ---------------------------------------------------------------------------
    def reply(self, text: str) -> None:
        conv, model = self.conv, self.model
        ids = conv.prompt_ids(text)
        cached = conv.session.prefix(ids)
        generated: list[int] = []
        stats = None
        t0 = time.perf_counter()
        with Interrupt() as stop:
            try:
                if len(ids) - cached > PROGRESS_MIN and len(ids) < model.config.max_position_embeddings:
                    prefill(self.engine, ids[:-1], stop, self.err)  # generate() then feeds the last token
                t_own = time.perf_counter() - t0
                if not stop.hit:
                    gen = generate(model, self.tok, ids, engine=self.engine, params=sampling_params_from_args(self.args))
                    for chunk in gen:
                        if chunk.token is not None:
                            generated.append(chunk.token)
                        if chunk.text:
                            self.out.write(chunk.text)
                            self.out.flush()
                        if chunk.finish_reason is not None:
                            stats = chunk.stats
                        if stop.hit:
                            gen.close()
                            break
            except KeyboardInterrupt:  # a second Ctrl-C: the cache may be half-updated, start it over
                self.engine.runner.forget()
                stop.hit = True
        self.out.write("\n")
        self.out.flush()
        conv.ids = ids + generated
        conv.turns += 1
        if stop.hit:
            self.say("[stopped]")
            self.keep_cache()
        if stats is not None:
            self.last = {"new": len(ids) - cached, "cached": cached, "prefill_s": t_own + stats["prefill_s"],
                         "generated": stats["generated_tokens"], "decode_s": stats["decode_s"],
                         "decode_tps": stats["decode_tps"]}
            if self.args.stats:  # this turn's figures, then where the time went
                self.say(self.stats_text() + "\n" + "\n".join(fmt_stats(stats).splitlines()[2:]))

    def keep_cache(self) -> None:
        """After a stopped reply, make the cache hold the whole conversation again: the tokens the stop
        left unfed (at least the last one shown), or all of it if the stop left the session empty, so the
        next turn prefills only its new tokens."""
        session, ids = self.conv.session, self.conv.ids
        if session.holds(ids):
            return
        with Interrupt() as stop:
            try:
                prefill(self.engine, ids, stop, self.err)
            except KeyboardInterrupt:
                self.engine.runner.forget()

    def start_over(self) -> None:
        """An empty conversation and prompt cache (on every rank of a distributed run)."""
        self.conv.reset()
        self.engine.runner.forget()
        self.last = None

    def stats_text(self) -> str:
        held = len(self.conv.session.longest())
        if self.last is None:
            return f"no reply yet; {held} tokens in the cache"
        s = self.last
        return (f"prefill: {s['new']} new tokens in {s['prefill_s']:.2f} s ({s['cached']} from the cache)\n"
                f"decode:  {s['generated']} tokens in {s['decode_s']:.2f} s ({s['decode_tps']:.2f} tok/s)\n"
                f"cache:   {held} tokens of {self.model.config.max_position_embeddings}")

    # ---- commands ----------------------------------------------------------------------------
    def confirm(self, reader: LineReader, question: str) -> bool:
        """Ask in a terminal; a script (stdin not a terminal) is not asked: the command goes ahead."""
        if reader.ps is None:
            return True
        try:
            return reader.read(f"{question} [y/N] ").strip().lower() in ("y", "yes")
        except (EOFError, KeyboardInterrupt):
            return False

    def command(self, line: str, reader: LineReader) -> bool:
        """Run a /command; False means leave the chat."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name in ("/help", "/?"):
            self.say(HELP)
        elif name == "/reset":
            if not self.conv.ids:
                self.say("the conversation is already empty")
            elif self.confirm(reader, "Clear the conversation?"):
                self.start_over()
                self.say("conversation cleared")
            else:
                self.say("kept the conversation")
        elif name == "/system":
            if not self.conv.template:
                self.say("a system prompt needs the chat template (this chat runs without one)")
            elif not rest:
                self.say(f"system prompt: {self.conv.system!r}" if self.conv.system else "no system prompt")
            elif self.conv.ids and not self.confirm(reader, "Changing the system prompt starts over. Continue?"):
                self.say("kept the conversation")
            else:
                had = bool(self.conv.ids)
                self.conv.system = None if rest == "off" else rest
                self.start_over()
                self.say("system prompt cleared" if rest == "off" else "system prompt set")
                if had:
                    self.say("the conversation starts over")
        elif name == "/stats":
            self.say(self.stats_text())
        else:
            self.say(f"unknown command {name}; /help lists the commands")
        return True

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, reader: LineReader) -> None:
        self.say(f"flashmoe-run: chatting with {self.args.bundle}. /help lists commands; Ctrl-C stops a "
                 "reply, Ctrl-D quits.")
        while True:
            try:
                text = reader.message()
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("(Ctrl-D or /exit quits)")
                continue
            if not text.strip():
                continue
            if text.lstrip().startswith("/") and "\n" not in text.strip():
                if not self.command(text, reader):
                    return
                continue
            try:
                self.reply(text)
            except FlashmoeError as e:
                self.say(f"error: {' '.join(str(e).split())}" + ("; /reset starts over" if "context" in str(e) else ""))


def chat(model, tok, args, engine: Engine | None = None) -> None:
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    Chat(model, tok, args, engine=engine).run(LineReader(tty))
