"""HTTP errors in the OpenAI and Anthropic shapes. Every error a client can cause is an APIError with a
4xx status and a one-line message saying what is wrong; nothing reaches the client as a traceback."""

from __future__ import annotations

from flashmoe.errors import CapacityError, FlashmoeError

# status -> (OpenAI error type, Anthropic error type)
_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def types(self) -> tuple[str, str]:
        return _TYPES.get(self.status, _TYPES[400] if self.status < 500 else _TYPES[500])

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.types()[0], "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        return {"type": "error", "error": {"type": self.types()[1], "message": self.message}}


def from_flashmoe(e: FlashmoeError) -> APIError:
    """A library error raised while admitting a request: too long for the context -> 413, else 400."""
    msg = " ".join(str(e).split())
    if isinstance(e, CapacityError):
        return APIError(413, msg, code="context_length_exceeded")
    return APIError(400, msg)


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)
