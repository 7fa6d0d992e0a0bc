"""One error shape for the front door's answers and the engine's behind it."""

from __future__ import annotations

import json

from metal_agent.core.access import Refuse, error_body as refusal_body
from metal_agent.core.openai_errors import error_body, error_type
from metal_agent.frontdoor.proxy import error_body as proxy_body

# llama-server's answer to a request while its model loads, as its server source builds it
# (`format_error_response("Loading model", ERROR_TYPE_UNAVAILABLE)` wrapped in {"error": ...}).
LLAMA_SERVER_LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


def test_a_503_has_the_engines_type_from_every_builder():
    engine = LLAMA_SERVER_LOADING["error"]["type"]
    assert json.loads(proxy_body(503, "model_not_running", "ns/a is not running"))["error"]["type"] == engine
    refused = Refuse(503, "cluster_unavailable", "the cluster could not be asked")
    assert refusal_body(refused)["error"]["type"] == engine


def test_types_follow_llama_server_for_each_status_and_openai_for_429():
    assert {s: error_type(s) for s in (400, 401, 403, 404, 429, 500, 501, 502, 503, 504, 413)} == {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
        404: "not_found_error", 429: "rate_limit_error", 500: "server_error", 501: "not_supported_error",
        502: "server_error", 503: "unavailable_error", 504: "server_error", 413: "invalid_request_error"}


def test_the_body_carries_the_message_and_our_code():
    assert error_body(429, "queue_full", "busy") == {
        "error": {"message": "busy", "type": "rate_limit_error", "code": "queue_full"}}
