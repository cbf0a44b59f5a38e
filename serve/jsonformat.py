"""response_format (OpenAI: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema"}};
Anthropic: output_format {"type": "json_schema", "schema"}) -> the JSON the answer must be.

Enforced token by token (grammar.py): the answer is JSON by construction, valid for the schema. A schema
that is not valid JSON Schema (jsonschema's check) or that llguidance cannot compile is a 400."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import bad
from .grammar import json_schema_grammar


@dataclass(frozen=True)
class JsonFormat:
    schema: dict | None  # None: any JSON object

    def grammar(self) -> str:
        return json_schema_grammar(self.schema)


def parse_response_format(rf: dict | None, where: str = "response_format") -> JsonFormat | None:
    """rf: a validated response_format (flashmoe.request.ResponseFormat dumped) or output_format."""
    if rf is None or rf.get("type") == "text":
        return None
    if rf["type"] == "json_object":
        return JsonFormat(None)
    schema = rf["json_schema"]["schema"] if "json_schema" in rf else rf["schema"]
    try:
        import jsonschema
    except ImportError:
        raise bad("json_schema needs the jsonschema package on the server (pip install jsonschema)",
                  where) from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise bad(f"{where}: the schema is not a valid JSON schema ({e.message})", where) from None
    return JsonFormat(schema)
