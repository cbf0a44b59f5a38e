"""response_format: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}.

Enforced by validation and retry: the answer must parse as JSON (an object for json_object) and, with a
schema, validate against it (jsonschema); otherwise the request is generated again, sampled with another
seed, up to ServerConfig.json_attempts times."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import bad

_FENCE = re.compile(r"^```(?:json)?\s*\n(.*?)\n?```$", re.DOTALL)


@dataclass
class JsonFormat:
    schema: dict | None  # None: any JSON object

    def check(self, text: str) -> tuple[str | None, str]:
        """(error or None, the JSON text to return: a ```json fence around it is removed)."""
        t = text.strip()
        m = _FENCE.match(t)
        if m:
            t = m.group(1).strip()
        try:
            value = json.loads(t)
        except ValueError as e:
            return f"not valid JSON ({e})", t
        if self.schema is None:
            return (None if isinstance(value, dict) else "not a JSON object"), t
        import jsonschema

        err = jsonschema.exceptions.best_match(
            jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(value))
        return (None if err is None else f"does not match the schema ({err.message})"), t


def parse_response_format(rf) -> JsonFormat | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise bad("response_format must be an object like {\"type\": \"json_object\"}", "response_format")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonFormat(None)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema must be a JSON schema object", "response_format")
        try:
            import jsonschema
        except ImportError:
            raise bad("json_schema needs the jsonschema package on the server (pip install jsonschema)",
                      "response_format") from None
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise bad(f"response_format.json_schema.schema is not a valid JSON schema ({e.message})",
                      "response_format") from None
        return JsonFormat(schema)
    raise bad(f"response_format type {kind!r} is not one of text, json_object, json_schema", "response_format")
