"""Output lines in the OpenAI Batch output format, one JSON object per request:

    {"id": "batch_req_12", "custom_id": "doc-1",
     "response": {"status_code": 200, "request_id": "req_12", "body": {chat.completion | text_completion}},
     "error": null}
    {"id": "batch_req_13", "custom_id": "doc-2", "response": null,
     "error": {"code": "invalid_json", "message": "line 13 is not valid JSON (...)", "line": 13, "param": null}}

`id` carries the input line number (batch_req_<line>): a resumed job uses it to know which requests are
answered. Bodies validate against the `openai` package's ChatCompletion / Completion types; errors have
the fields of openai.types.BatchError.
"""

from __future__ import annotations

import re
import time

from flashmoe import __version__

from .requests import BadLine, Request

FINGERPRINT = f"flashmoe-{__version__}"
_ID = re.compile(r"batch_req_(\d+)\Z")


def line_id(line: int) -> str:
    return f"batch_req_{line}"


def line_of(record: dict) -> int | None:
    """The input line number an output record answers, or None if it is not one of ours."""
    m = _ID.match(str(record.get("id", "")))
    return int(m.group(1)) if m else None


def answer_record(req: Request, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                  model: str, created: int | None = None) -> dict:
    created = int(time.time()) if created is None else created
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    finish_reason = finish_reason if finish_reason in ("stop", "length") else "stop"
    if req.chat:
        body = {"id": f"chatcmpl-{req.line}", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason, "logprobs": None}],
                "usage": usage, "system_fingerprint": FINGERPRINT}
    else:
        body = {"id": f"cmpl-{req.line}", "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
                "usage": usage, "system_fingerprint": FINGERPRINT}
    return {"id": line_id(req.line), "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{req.line}", "body": body}, "error": None}


def error_record(bad: BadLine) -> dict:
    return {"id": line_id(bad.line), "custom_id": bad.custom_id, "response": None,
            "error": {"code": bad.code, "message": bad.message, "line": bad.line, "param": bad.param}}
