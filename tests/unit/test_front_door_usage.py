"""Reading a response's token counts off the relayed bytes (frontdoor/usage.py, cost.py).

The bodies are the engines' own shapes: llama-server's JSON completion and its final
stream event (usage plus timings; nlohmann sorts keys, so `usage` comes last), and
mlx_lm.server's (mlx_lm 0.32 server.py: `generate_response` / `completion_usage_response`,
the usage event only with `stream_options.include_usage`).
"""

from __future__ import annotations

import json

import pytest

from metal_agent.frontdoor.cost import request_cost
from metal_agent.frontdoor.metrics import FrontDoorMetrics
from metal_agent.frontdoor.upstream import ResponseHead
from metal_agent.frontdoor.usage import TAIL, WHOLE_JSON, Dechunk, Usage, UsageScan, last_event_usage, usage_of

LLAMA_JSON = {"choices": [{"finish_reason": "length", "index": 0, "message": {"content": "ab", "role": "assistant"}}],
              "created": 1, "id": "chatcmpl-x", "model": "tiny", "object": "chat.completion",
              "timings": {"predicted_n": 2, "prompt_n": 9},
              "usage": {"completion_tokens": 2, "prompt_tokens": 9, "total_tokens": 11}}
LLAMA_LAST_EVENTS = [
    {"choices": [{"delta": {"content": "x"}, "finish_reason": None, "index": 0}], "object": "chat.completion.chunk"},
    {"choices": [{"delta": {}, "finish_reason": "length", "index": 0}], "object": "chat.completion.chunk",
     "timings": {"predicted_n": 3, "prompt_n": 12},
     "usage": {"completion_tokens": 3, "prompt_tokens": 12, "total_tokens": 15}},
]
MLX_EVENTS = [
    {"choices": [{"delta": {"content": "x"}, "finish_reason": None, "index": 0}], "object": "chat.completion.chunk"},
    {"choices": [{"delta": {"content": ""}, "finish_reason": "length", "index": 0}], "object": "chat.completion.chunk"},
]
MLX_USAGE_EVENT = {"id": "x", "object": "chat.completion", "choices": [],
                   "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}}


def sse(events: list[dict], done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def split_every(data: bytes, n: int) -> list[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


def test_usage_from_openai_usage_else_llama_timings_else_nothing():
    assert usage_of(LLAMA_JSON) == Usage(9, 2)
    assert usage_of({"timings": {"prompt_n": 5, "predicted_n": 1}}) == Usage(5, 1)
    assert usage_of({"timings": {"cache_n": 30, "prompt_n": 1, "predicted_n": 3}}) == Usage(31, 3)  # cached too
    assert usage_of({"usage": {"prompt_tokens": "5", "completion_tokens": 1}}) is None
    assert usage_of({"usage": {"prompt_tokens": True, "completion_tokens": 1}}) is None
    assert usage_of({"usage": {"prompt_tokens": -1, "completion_tokens": 1}}) is None
    assert usage_of([1]) is None


def test_the_last_event_with_counts_wins_and_broken_events_are_skipped():
    payload = sse([MLX_USAGE_EVENT]) + b"data: {not json\n\n" + sse(LLAMA_LAST_EVENTS)
    assert last_event_usage(payload) == Usage(12, 3)
    assert last_event_usage(sse(MLX_EVENTS)) is None
    assert last_event_usage(b"") is None


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_dechunk_restores_the_payload_whatever_the_read_sizes(size):
    payload = [sse(LLAMA_LAST_EVENTS[:1]) * 3, sse(LLAMA_LAST_EVENTS[1:]), b"x" * 300]
    dechunk = Dechunk()
    out = b"".join(dechunk.feed(piece) for piece in split_every(chunked(payload), size))
    assert out == b"".join(payload)


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_a_chunked_llama_stream_yields_its_final_usage(size):
    scan = UsageScan(chunked=True, stream=True)
    for piece in split_every(chunked([sse([e], done=False) for e in LLAMA_LAST_EVENTS] + [b"data: [DONE]\n\n"]), size):
        scan.feed(piece)
    assert scan.result() == Usage(12, 3)


def test_a_long_stream_keeps_only_its_tail_and_still_finds_the_usage():
    scan = UsageScan(chunked=False, stream=True)
    token = sse(LLAMA_LAST_EVENTS[:1], done=False)
    for _ in range(20_000):
        scan.feed(token)
    scan.feed(sse(LLAMA_LAST_EVENTS[1:]))
    assert scan._size <= 2 * TAIL + len(token)
    assert scan.result() == Usage(12, 3)


def test_an_mlx_stream_counts_only_when_it_sent_usage():
    without = UsageScan(chunked=False, stream=True)
    without.feed(sse(MLX_EVENTS))
    assert without.result() is None
    with_usage = UsageScan(chunked=False, stream=True)
    with_usage.feed(sse(MLX_EVENTS + [MLX_USAGE_EVENT]))
    assert with_usage.result() == Usage(7, 4)


def test_a_json_body_split_anywhere_is_parsed_whole_and_a_huge_one_by_its_tail():
    body = json.dumps(LLAMA_JSON).encode()
    scan = UsageScan(chunked=False, stream=False)
    for piece in split_every(body, 3):
        scan.feed(piece)
    assert scan.result() == Usage(9, 2)
    # a large embeddings answer (llama-server's shape: keys sorted, usage last; prompt tokens only)
    embeddings = json.dumps({"data": [{"embedding": [0.123456789] * 2000, "index": i, "object": "embedding"}
                                      for i in range(40)], "model": "tiny", "object": "list",
                             "usage": {"prompt_tokens": 321, "total_tokens": 321}}).encode()
    assert len(embeddings) > WHOLE_JSON
    huge = UsageScan(chunked=False, stream=False)
    for piece in split_every(embeddings, 4096):
        huge.feed(piece)
    assert huge._size <= 2 * TAIL + 4096
    assert huge.result() == Usage(321, 0)
    junk = UsageScan(chunked=False, stream=False)
    for _ in range(300):
        junk.feed(b" " * 1024)
    assert junk.result() is None


def _head(status=200, kind=b"application/json", framing="length") -> ResponseHead:
    return ResponseHead(status, b"HTTP/1.1 200 OK", [(b"content-type", kind)], framing, 10)


def test_cost_is_recorded_for_completions_only_and_counts_tokens_ttft_and_missing_usage():
    metrics = FrontDoorMetrics()
    svc = metrics.for_service("ns/a")
    clock = iter([10.25, 10.5]).__next__
    assert request_cost(b"GET", _head(), svc, 10.0, clock) is None
    assert request_cost(b"POST", _head(status=400), svc, 10.0, clock) is None
    assert request_cost(b"POST", _head(kind=b"text/html"), svc, 10.0, clock) is None
    stream = request_cost(b"POST", _head(kind=b"text/event-stream", framing="chunked"), svc, 10.0, clock)
    assert stream is not None
    stream.feed(chunked([sse(LLAMA_LAST_EVENTS)]))
    stream.finish()
    plain = request_cost(b"POST", _head(kind=b"text/event-stream; charset=utf-8", framing="close"), svc, 10.0, clock)
    plain.feed(sse(MLX_EVENTS))
    plain.finish()
    value = metrics.registry.get_sample_value
    labels = {"service": "ns/a"}
    assert value("llmkube_metal_agent_front_door_prompt_tokens_total", labels) == 12
    assert value("llmkube_metal_agent_front_door_completion_tokens_total", labels) == 3
    assert value("llmkube_metal_agent_front_door_usage_missing_total", labels) == 1
    # each stream's first event, once (at 10.25 and 10.5 for arrivals at 10.0); JSON answers have none
    assert value("llmkube_metal_agent_front_door_time_to_first_token_seconds_count", labels) == 2
    assert value("llmkube_metal_agent_front_door_time_to_first_token_seconds_sum", labels) == pytest.approx(0.75)


def test_a_bug_in_the_tap_never_reaches_the_relay(monkeypatch):
    svc = FrontDoorMetrics().for_service("ns/a")
    cost = request_cost(b"POST", _head(), svc, 0.0, lambda: 0.0)

    def boom(_self, _data):
        raise RuntimeError("bug")

    monkeypatch.setattr(UsageScan, "feed", boom)
    cost.feed(b"{}")  # logged and dropped, not raised
    cost.feed(b"{}")
    cost.finish()
    assert svc.usage_missing._value.get() == 1  # the response is counted as one without usage
