"""One shape for every error a client of the front door can get, the engine's own.

Behind one base URL a client meets errors from two places: the front door (a refusal, a full
queue, a model not running, an engine that broke off) and llama-server behind it ("Loading model",
a bad request). A client that branches on `error.type` must get one answer for one status from
both, so the types are llama-server's (`format_error_response` in its server source:
400 invalid_request_error, 401 authentication_error, 403 permission_error, 404 not_found_error,
500 server_error, 501 not_supported_error, 503 unavailable_error), with OpenAI's
rate_limit_error for the 429 llama-server never sends. `code` is a short word saying which of
the front door's answers it is, as OpenAI's own `code` strings do (llama-server repeats the
status there).
"""

from __future__ import annotations

__all__ = ["error_body", "error_type"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 429: "rate_limit_error", 500: "server_error", 501: "not_supported_error",
          503: "unavailable_error"}


def error_type(status: int) -> str:
    return _TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, code: str, message: str) -> dict:
    """`{"error": {...}}` as OpenAI's API and llama-server answer; never put a credential in `message`."""
    return {"error": {"message": message, "type": error_type(status), "code": code}}
