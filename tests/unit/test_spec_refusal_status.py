"""A spec refused by the Mac owner's policy reads as such on status: its own reason
(ExtraArgRefused, SourceNotAllowed) instead of InvalidSpec, in every condition that names it."""

from __future__ import annotations

from metal_agent.core.process import Snapshot, State
from metal_agent.core.spec_policy import INVALID_SPEC, spec_reason
from metal_agent.core.status import StatusInputs, compute_status

T0 = "2026-01-01T00:00:00Z"
ERR = ("InferenceService ns/a: spec.extraArgs[0]: '--rpc' is refused: it makes llama-server connect ...",)


def conds(status: dict) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status["conditions"]}


def test_a_refused_spec_with_nothing_running_says_so_everywhere():
    status = compute_status(StatusInputs(generation=1, wants_process=True, spec_errors=ERR,
                                         spec_reason="ExtraArgRefused"), None, T0)
    c = conds(status)
    assert status["phase"] == "Failed"
    assert c["MetalSpecAccepted"][:2] == ("False", "ExtraArgRefused") and "refused" in c["MetalSpecAccepted"][2]
    assert c["MetalProcessReady"][:2] == ("False", "ExtraArgRefused")
    assert c["Available"][1] == c["Degraded"][1] == "ExtraArgRefused"


def test_a_refused_change_beside_the_process_the_agent_started_keeps_it_serving():
    ready = Snapshot(key="ns/a", spec_hash="h" * 64, state=State.READY, pid=4, port=8081)
    status = compute_status(StatusInputs(generation=2, wants_process=True, spec_errors=ERR, process=ready,
                                         spec_reason="SourceNotAllowed"), None, T0)
    c = conds(status)
    assert status["phase"] == "Ready"
    assert c["MetalSpecAccepted"][1] == "SourceNotAllowed" and "still serving" in c["MetalSpecAccepted"][2]
    assert c["Degraded"][:2] == ("True", "SourceNotAllowed")


def test_the_reason_of_a_mixed_list_is_the_refusal():
    assert spec_reason(["", "ExtraArgRefused"]) == "ExtraArgRefused"
    assert spec_reason(["SourceNotAllowed", "ExtraArgRefused"]) == "ExtraArgRefused"
    assert spec_reason(["", ""]) == INVALID_SPEC


def test_an_unsupported_field_reads_as_refused_by_its_own_reason_and_names_the_field():
    """A field LLMKube documents that the agent cannot honour (core.fields) is never dropped quietly."""
    from metal_agent.core.claim import evaluate
    from tests.support.manifests import isvc_doc, model_doc

    outcome = evaluate(isvc_doc(hotCacheMaxSize="50GB"), model_doc())
    errors = tuple(e.describe() for e in outcome.errors)
    reason = spec_reason(e.reason for e in outcome.errors)
    status = compute_status(StatusInputs(generation=1, wants_process=True, spec_errors=errors,
                                         spec_reason=reason), None, T0)
    accepted = conds(status)["MetalSpecAccepted"]
    assert accepted[:2] == ("False", "UnsupportedField")
    assert "refused" in accepted[2] and "spec.hotCacheMaxSize" in accepted[2]
    # A mistake in the same spec does not hide it, and a security refusal still comes first.
    assert spec_reason(["", "UnsupportedField"]) == "UnsupportedField"
    assert spec_reason(["UnsupportedField", "ExtraArgRefused"]) == "ExtraArgRefused"
