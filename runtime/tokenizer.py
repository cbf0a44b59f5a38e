"""The bundle's tokenizer (tokenizer.json through the `tokenizers` library), its chat template (jinja2,
from chat_template.jinja or tokenizer_config.json) and a streaming detokenizer.

In a bundle, every tokenizer file read here must be one its manifest lists, with the listed size and
sha256 (checked through format.verify's record, so only a changed file is hashed again): a chat template
edited or dropped in after conversion is refused, not silently used. `check_tokenizer` is what
flashmoe-convert runs on a source before converting: tokenizer.json loads, the chat template parses."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from flashmoe.format import Bundle, BundleError
from flashmoe.format.manifest import MANIFEST
from flashmoe.format.verify import verify

READ_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _token_str(v) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict):  # {"content": "<|im_end|>", ...}
        return v.get("content")
    return None


class Tokenizer:
    def __init__(self, path: str | Path, config_eos: list[int] | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if (path / MANIFEST).is_file():
            _check_against_manifest(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise BundleError(f"{path}: tokenizer.json is missing; the bundle needs the source's tokenizer files")
        try:
            self._tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
            raise BundleError(f"{tj}: cannot be read ({e}); re-pull or re-convert the bundle") from None
        cfg = {}
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            try:
                cfg = json.loads(tc.read_text())
            except ValueError as e:
                raise BundleError(f"{tc}: not valid JSON ({e})") from None
        self.config = cfg
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif isinstance(cfg.get("chat_template"), str):
            template = cfg["chat_template"]
        elif isinstance(cfg.get("chat_template"), list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in cfg["chat_template"] if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template = template
        eos = set(config_eos or [])
        gc = path / "generation_config.json"
        if gc.is_file():
            try:
                g = json.loads(gc.read_text()).get("eos_token_id")
                eos |= set([g] if isinstance(g, int) else (g or []))
            except ValueError:
                pass
        if self.eos_token is not None:
            i = self._tok.token_to_id(self.eos_token)
            if i is not None:
                eos.add(i)
        self.eos_token_ids: set[int] = {int(e) for e in eos}
        self._template = None

    # ---- basic ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, s: str) -> int | None:
        return self._tok.token_to_id(s)

    # ---- chat -----------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        if not self.chat_template:
            raise BundleError("the bundle has no chat template (chat_template.jinja or tokenizer_config.json); "
                              "pass --no-chat-template to use the raw prompt")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except TemplateError as e:
            raise BundleError(f"chat template failed: {e}") from None


def compile_chat_template(text: str):
    """A chat template compiled in the sandbox the templates of Hugging Face checkpoints expect
    (raise_exception, tojson, strftime_now, loop controls). Raises BundleError if it does not parse."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except TemplateError as e:
        raise BundleError(f"the chat template does not parse ({str(e).splitlines()[0] if str(e) else e!r})") from None


def check_tokenizer(path: str | Path) -> None:
    """A directory's tokenizer is usable: tokenizer.json loads and the chat template (if any) parses.
    Raises BundleError saying which file is wrong."""
    tok = Tokenizer(path)
    if tok.chat_template is not None:
        compile_chat_template(tok.chat_template)


def _check_against_manifest(path: Path) -> None:
    """Every tokenizer file of bundle `path` that is on disk or listed is listed and intact."""
    bundle = Bundle.open(path, check_files=False)
    names = [n for n in READ_FILES if n in bundle.files or (path / n).exists() or (path / n).is_symlink()]
    unlisted = [n for n in names if n not in bundle.files]
    if unlisted:
        raise BundleError(f"{path / unlisted[0]} is not part of the bundle (its manifest does not list it), so "
                          "flashmoe does not use it: remove it, or re-run flashmoe-convert to make a bundle with it")
    bad = verify(bundle, names=names, progress=False)
    if bad:
        n, why = sorted(bad.items())[0]
        raise BundleError(f"{path / n}: {why}; the bundle's tokenizer files must be the converted ones: re-run "
                          "flashmoe-pull or flashmoe-convert to repair it")


class StreamingDetokenizer:
    """Turns a growing token list into text deltas; never emits half of a UTF-8 character that spans tokens
    (the decoded text of an incomplete byte sequence ends in U+FFFD, which we hold back)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # decode from here (a little context keeps leading spaces right)
        self.read = 0  # tokens already turned into text

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        new_text = self.tok.decode(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        new_text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
