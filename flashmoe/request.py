"""The typed request model: every field of an OpenAI Chat Completions, OpenAI Completions or Anthropic
Messages body checked for its type, range and token ids before anything reaches the engine.

    body = parse_json(raw_bytes)                          # JSON, nesting depth, lone surrogates
    req = validate(ChatRequest, body, vocab_size=V)       # InputError naming the field on any mistake

No web framework here (flashmoe.batch reads the same shapes from its input lines). Unknown fields are
ignored (clients send ones this server has no use for); known fields must have their documented type.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from flashmoe.errors import InputError

MAX_DEPTH = 64  # nesting of objects and arrays in a body (a JSON schema needs far fewer)
MAX_STOP = 16
MAX_SEED = (1 << 63) - 1
MAX_TOP_LOGPROBS = 20


# ---- the raw body ---------------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict:
    """A request body -> its JSON object. Refuses invalid JSON, nesting deeper than MAX_DEPTH and strings
    (values or keys) holding a lone UTF-16 surrogate, which no tokenizer can encode."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"the request body is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise InputError(f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise InputError(f"the request body is not valid JSON ({e})") from None
    check_tree(body)
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    return body


def check_tree(value: Any) -> None:
    """Depth and surrogates of a parsed JSON value, walked without recursion."""
    stack = [(value, 1, "body")]
    while stack:
        v, depth, where = stack.pop()
        if isinstance(v, str):
            _utf8(v, where)
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise InputError(f"the request body is nested deeper than {MAX_DEPTH} levels")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str):
                    _utf8(k, where)
                stack.append((x, depth + 1, f"{where}.{k}"))


def _utf8(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where} holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair); "
                         "send valid Unicode") from None


def validate(cls: type[BaseModel], body: dict, **context) -> BaseModel:
    """body -> cls, or an InputError naming the first fields that are wrong. context: vocab_size (token
    ids in a prompt must be below it)."""
    try:
        return cls.model_validate(body, context=context)
    except ValidationError as e:
        raise InputError(describe(e)) from None


def describe(e: ValidationError, most: int = 3) -> str:
    parts = []
    for err in e.errors(include_url=False)[:most]:
        loc = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x)) or "body"
        parts.append(f"{loc}: {err['msg']}")
    more = e.error_count() - most
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _is_union_tag(x) -> bool:  # pydantic names the union member it tried: "str", "list[TextPart]", ...
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "dict", "list") or "[" in x
                                   or x[:1].isupper() or x.startswith("literal"))


def field_of(message: str) -> str | None:
    """The top-level field an InputError from validate() names first (its 'param')."""
    head = message.split(":", 1)[0].split(".", 1)[0]
    return head if head and " " not in head else None


# ---- shared pieces ----------------------------------------------------------------------------------


class Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True, populate_by_name=True)


Float = Annotated[float, Field(allow_inf_nan=False)]
JsonObject = dict[str, Any]


class Sampling(Model):
    model: Annotated[str, Field(min_length=1)]
    stream: bool | None = None
    temperature: Annotated[Float, Field(ge=0, le=1e4)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=1 << 31)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None


class StreamOptions(Model):
    include_usage: bool | None = None


def _stops(v):
    if isinstance(v, str):
        return [v]
    return v


Stop = Annotated[list[str], Field(max_length=MAX_STOP)]


# ---- OpenAI Chat Completions ------------------------------------------------------------------------


class TextPart(Model):
    type: Literal["text", "input_text"]
    text: str


Content = Union[str, list[TextPart], None]


class FunctionCall(Model):
    name: Annotated[str, Field(min_length=1)]
    arguments: Union[str, JsonObject] = "{}"


class ToolCallIn(Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(Model):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class Tool(Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Model):
    name: Annotated[str, Field(min_length=1)]


class NamedToolChoice(Model):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(Model):
    name: str | None = None
    schema_: JsonObject = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {\"name\": ..., \"schema\": {...}}")
        return self


class ChatRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: Union[str, Stop, None] = None
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    chat_template_kwargs: JsonObject | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    user: str | None = None

    @property
    def stops(self) -> list[str]:
        return _stops(self.stop) or []

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- OpenAI Completions -----------------------------------------------------------------------------


TokenIds = Annotated[list[int], Field(min_length=1)]  # each in [0, vocab_size): CompletionRequest checks


class CompletionRequest(Sampling):
    prompt: Union[str, TokenIds, Annotated[list[Union[str, TokenIds]], Field(min_length=1, max_length=1)]]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: Union[str, Stop, None] = None
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None
    echo: Literal[False] | None = None
    suffix: Literal[""] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _token_ids_in_vocab(cls, v, info: ValidationInfo):
        vocab = (info.context or {}).get("vocab_size")
        one = v[0] if isinstance(v, list) and v and isinstance(v[0], (str, list)) else v
        bad = next((t for t in one if t < 0 or (vocab is not None and t >= vocab)), None) \
            if isinstance(one, list) else None
        if bad is not None:
            where = "negative" if bad < 0 else "not in the model's vocabulary"
            raise ValueError(f"token id {bad} is {where}; token ids must be in [0, {vocab or 'vocabulary size'})")
        return v

    @property
    def stops(self) -> list[str]:
        return _stops(self.stop) or []

    @property
    def one_prompt(self) -> str | list[int]:
        """The prompt as text or token ids (a one-element list of either is unwrapped)."""
        p = self.prompt
        if isinstance(p, list) and isinstance(p[0], (str, list)):
            return p[0]
        return p


# ---- Anthropic Messages -----------------------------------------------------------------------------


class TextBlock(Model):
    type: Literal["text"]
    text: str


class ToolUseBlock(Model):
    type: Literal["tool_use"]
    id: str | None = None
    name: Annotated[str, Field(min_length=1)]
    input: JsonObject = Field(default_factory=dict)


class ToolResultBlock(Model):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[TextBlock], None] = None
    is_error: bool | None = None


class ThinkingBlock(Model):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Model):
    type: Literal["redacted_thinking"]
    data: str | None = None


Block = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
                  Field(discriminator="type")]


class AnthropicMessage(Model):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class AnthropicTool(Model):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    input_schema: JsonObject | None = None
    type: Literal["custom"] | None = None


class AnthropicToolChoice(Model):
    type: Literal["auto", "any", "none", "tool"]
    name: Annotated[str, Field(min_length=1)] | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[int, Field(ge=0)] | None = None


class AnthropicOutputFormat(Model):
    type: Literal["json_schema"]
    schema_: JsonObject = Field(alias="schema")


class MessagesRequest(Sampling):
    max_tokens: Annotated[int, Field(ge=1)]
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: Union[str, list[TextBlock], None] = None
    stop_sequences: Stop | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: Thinking | None = None
    output_format: AnthropicOutputFormat | None = None
    metadata: JsonObject | None = None

    @property
    def stops(self) -> list[str]:
        return list(self.stop_sequences or [])


# ---- OpenAI Responses (stateless) -------------------------------------------------------------------


class InputText(Model):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(Model):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[InputText]]


class FunctionCallItem(Model):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str = "{}"


class FunctionCallOutputItem(Model):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: Union[str, list[InputText]]


class ResponsesTool(Model):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class ResponsesToolChoice(Model):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]


class TextFormat(Model):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: JsonObject | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("type json_schema needs a schema")
        return self


class TextConfig(Model):
    format: TextFormat | None = None


class ResponsesRequest(Sampling):
    input: Union[str, Annotated[list[Union[FunctionCallItem, FunctionCallOutputItem, InputMessage]],
                                Field(min_length=1)]]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], ResponsesToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    previous_response_id: None = None  # stateless: a stored response cannot be continued
    store: bool | None = None
    metadata: JsonObject | None = None
    user: str | None = None

    @property
    def stops(self) -> list[str]:
        return []
