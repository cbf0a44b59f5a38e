"""Constrained decoding with llguidance: the answer follows a grammar token by token.

    grammars = Grammars(tokenizer, n_vocab, eos)          # once per server (the bundle's tokenizer.json)
    g = grammars.compile(json_schema_grammar(schema), "response_format")   # 400 naming what it refused
    params.grammar = grammars.mask(g)                    # one matcher per sequence; the engine masks a
                                                         # step's grammar rows together (sampling.mask_logits)

Grammars: `response_format` JSON (json_object: any object; json_schema: that schema), and Qwen3.5 XML tool
calls (toolcalls.py parses them) whose parameters follow each tool's JSON schema: a required call (named,
`required`, Anthropic `any`/`tool`) from the `<function=` the prompt ends with; `auto`: free text, and once
the model writes `<tool_call>` the call is constrained. Values in the XML syntax: a string parameter is its
raw text, a boolean `True`/`False`, null `None`, numbers, objects and arrays JSON (as the chat template
writes them and toolcalls.convert_value reads them).

A schema llguidance cannot compile, or a tool schema part the XML syntax cannot carry (a string `pattern`
or `format`), is an APIError 400 naming the part: never a silent fallback to unconstrained output.
"""

from __future__ import annotations

import json
import numpy as np

from .errors import APIError

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no unbounded runs of whitespace
# a raw string parameter value and the tag that closes it, as one lazy lexeme (it ends at the first
# "\n</parameter>\n"; as two lexemes the value's open-ended regex would swallow the tag's first bytes, and the
# lexer cannot go back); LENGTH: the value's own length bounds. No function or tool-call tag inside.
_CLOSE = "\\n</parameter>\\n"
_RAW = r"/(?s:.{LENGTH})\n<\/parameter>\n/ & ~/(?s:.*<\/?(function|tool_call)[=>].*)/"
_NAME = r"/[A-Za-z_][A-Za-z0-9_.\-]*/"
_STRING_KEYS_REFUSED = ("pattern", "format")


class GrammarError(APIError):
    def __init__(self, where: str, message: str):
        super().__init__(400, f"{where}: {message}", where.split(".", 1)[0].split("[", 1)[0])


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def json_schema_grammar(schema: dict | None) -> str:
    """A JSON object (schema None) or a value of `schema`, in llguidance's grammar form."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                            defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError("response_format", f"the schema is not usable ({e})") from None


class _ToolLark:
    """Lark rules for Qwen3.5 XML tool calls of the given tools ({name: parameters schema})."""

    def __init__(self, tools: dict[str, dict], where: str):
        self.tools, self.where, self.rules, self.n = tools, where, [], 0

    def _rule(self, body: str) -> str:
        self.n += 1
        name = f"r{self.n}"
        self.rules.append(f"{name}: {body}")
        return name

    def _raw(self, lo: int = 0, hi: int | None = None) -> str:
        """A raw string value with its closing tag (see _RAW): one lazy lexeme."""
        self.n += 1
        name = f"raw{self.n}"
        self.rules.append(f"{name}[lazy]: " + _RAW.replace("LENGTH", f"{int(lo)},{'' if hi is None else int(hi)}"))
        return name

    def value(self, schema, where: str) -> str:
        """A parameter's value in `schema` followed by its closing tag `\\n</parameter>\\n`."""
        if schema is True or schema is None:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(where, "a property schema must be an object")
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            if not isinstance(values, list) or not values:
                raise GrammarError(where, "enum must be a non-empty list")
            return self._rule(f'({" | ".join(_lit(v if isinstance(v, str) else _py(v)) for v in values)}) "{_CLOSE}"')
        types = schema.get("type")
        if types is None:
            types = ["object"] if "properties" in schema else ["array"] if "items" in schema else None
        if types is None:
            return _json(schema)  # any JSON value
        types = [types] if isinstance(types, str) else types
        alts = []
        for t in types:
            if t == "string":
                bad = [k for k in _STRING_KEYS_REFUSED if k in schema]
                if bad:
                    raise GrammarError(f"{where}.{bad[0]}", f"{bad[0]} is not supported for a string parameter of a "
                                                            "constrained tool call (raw text)")
                alts.append(self._raw(schema.get("minLength", 0), schema.get("maxLength")))
            elif t == "boolean":
                alts.append(f'("True" | "False") "{_CLOSE}"')
            elif t == "null":
                alts.append(f'"None" "{_CLOSE}"')
            elif t in ("integer", "number", "object", "array"):
                alts.append(f'{_json(dict(schema, type=t))} "{_CLOSE}"')
            else:
                raise GrammarError(f"{where}.type", f"type {t!r} is not a JSON schema type")
        return self._rule(" | ".join(alts))

    def params(self, name: str, schema: dict) -> str:
        where = f"{self.where}[{name}]"
        if not isinstance(schema, dict):
            raise GrammarError(where, "parameters must be a JSON schema object")
        props = schema.get("properties") or {}
        if not isinstance(props, dict):
            raise GrammarError(f"{where}.properties", "must be an object")
        required = schema.get("required") or []
        parts = []
        for key, sub in props.items():
            if not key or any(c in key for c in "<>\n"):
                raise GrammarError(f"{where}.properties", f"parameter name {key!r} cannot be written as "
                                                          "<parameter=NAME> (no <, > or newline)")
            one = f'"<parameter={key}>\\n" {self.value(sub, f"{where}.properties.{key}")}'
            parts.append(f"({one})" + ("" if key in required else "?"))
        missing = [k for k in required if k not in props]
        if missing:
            raise GrammarError(f"{where}.required", f"names {missing} that are not among its properties")
        if not props and schema.get("additionalProperties", True) is not False:  # any parameters
            parts.append(f'("<parameter=" {_NAME} ">\\n" {self._raw()})*')
        return self._rule(" ".join(parts) + ' "</function>\\n</tool_call>"' if parts else
                          '"</function>\\n</tool_call>"')

    def call(self, names: list[str]) -> str:
        """From just after `<function=`: a name of `names`, `>\\n`, its parameters, the closing tags."""
        return self._rule(" | ".join(f'"{n}>\\n" {self.params(n, self.tools[n])}' for n in names))


def tool_call_grammar(tools: dict[str, dict], force: str | None, where: str = "tools") -> str:
    """force: a function name (the prompt ends `<function=NAME>\\n`), "" (any tool; the prompt ends
    `<function=`) or None (auto: free text; a call, once opened, follows its tool's schema)."""
    import llguidance

    for name in tools:
        if not name or any(c in name for c in "<>\n"):
            raise GrammarError(where, f"tool name {name!r} cannot be written as <function=NAME>")
    lark = _ToolLark(tools, where)
    if force:
        start = lark.params(force, tools[force])
    elif force == "":
        start = lark.call(list(tools))
    else:
        call = lark.call(list(tools))
        more = f'("\\n<tool_call>\\n<function=" {call})*'
        start = f'TEXT | text "\\n<function=" {call} {more}'
        lark.rules += ['text[stop="<tool_call>"]: /(?s:.*)/', "TEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/"]
    return llguidance.LLMatcher.grammar_from_lark("\n".join([f"start: {start}", *lark.rules]))


def _json(schema: dict) -> str:
    """A JSON value of `schema` inside a Lark grammar, compact like the top-level JSON grammars."""
    return f"%json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS})}"


def _py(v) -> str:
    """A non-string enum value as the chat template writes it (str() of a bool/None, JSON otherwise)."""
    if v is True or v is False or v is None:
        return str(v)
    return json.dumps(v)


class Grammars:
    """llguidance's tokenizer for the bundle (built once), the grammars' checks, and the batch masker: the
    engine (runtime/sampling.py mask_logits) asks it for every grammar row's mask of a step in one call."""

    def __init__(self, tokenizer_json: str, n_vocab: int, eos: list[int]):
        import llguidance

        self.n_vocab, self.eos = n_vocab, sorted(eos)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=self.eos)
        self.executor = llguidance.LLExecutor()
        self.words = (n_vocab + 31) // 32
        self._eos_only = np.zeros(self.words, np.int32)
        for t in self.eos:
            self._eos_only.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))

    def compile(self, grammar: str, where: str) -> str:
        """The grammar checked against this tokenizer: a 400 naming `where` when llguidance refuses it."""
        import llguidance

        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise GrammarError(where, "the grammar library cannot use this schema (" +
                               " ".join(" ".join(messages).split())[:400] + ")")
        return grammar

    def mask(self, grammar: str) -> "GrammarMask":
        """One sequence's grammar state, for SamplingParams.grammar."""
        import llguidance

        return GrammarMask(llguidance.LLMatcher(self.tokenizer, grammar, log_level=0), self)

    def masks(self, states: list["GrammarMask"], generated: list[list[int]]) -> np.ndarray:
        """Each sequence's matcher fed its new tokens, then the tokens each allows next, computed together
        on llguidance's thread pool: int32 [n, words], token t is bit t % 32 of word t // 32. A matcher in
        error (it cannot happen with its own mask applied) allows only EOS, ending the answer."""
        out = np.empty((len(states), self.words), np.int32)
        live = []
        for k, (s, ids) in enumerate(zip(states, generated)):
            s.feed(ids)
            if s.matcher.is_error():
                out[k] = self._eos_only
            else:
                live.append((s.matcher, k))
        if live:
            self.executor.unsafe_compute_mask_ptr(live, out.ctypes.data, self.words * 4, len(states))
        return out


class GrammarMask:
    """One sequence's grammar state: its llguidance matcher and how many of its tokens the matcher has
    consumed. `masker` (the Grammars) computes the masks of a batch's grammar rows in one call."""

    def __init__(self, matcher, masker: Grammars):
        self.matcher, self.masker = matcher, masker
        self._fed = 0

    def feed(self, generated: list[int]) -> None:
        for t in generated[self._fed:]:
            self.matcher.consume_token(int(t))
        self._fed = len(generated)

    def allowed(self, generated: list[int]) -> np.ndarray:
        """A bool [n_vocab] of the tokens allowed after `generated` (one row of `masks`)."""
        words = self.masker.masks([self], [generated])[0]
        return np.unpackbits(words.view(np.uint8), bitorder="little", count=self.masker.n_vocab).view(np.bool_)
