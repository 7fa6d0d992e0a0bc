"""Attacks through a Model's `spec.source`: a namespace user names a file outside the folders the
Mac's owner serves models from. Checked on the real file system (symlinks, `..`, a root that is
itself a symlink), through the same function the agent and `metal-agent render` use; each case
asserts the refusal and that the target file was never read (its access time, set before its
modification time so that relatime records any read, is unchanged)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metal_agent.adapters.model_roots import source_refusal, workload_refusals
from metal_agent.cli.spec_policy_flags import build_policy
from metal_agent.core.claim import evaluate
from metal_agent.core.model_roots import Resolved, inside
from metal_agent.core.result import Parsed
from metal_agent.core.status_owner import source_refused
from tests.support.manifests import isvc_doc, model_doc


def _trap(path: Path, text: str = "secret\n") -> Path:
    """A file whose every read shows: atime before mtime, so relatime updates it on a read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (1, time.time()))
    return path


def _untouched(path: Path) -> bool:
    return os.stat(path).st_atime == 1


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    inside_file = _trap(root / "ok.gguf")
    secret = _trap(tmp_path / "private" / "id_ed25519")
    return root, inside_file, secret


def test_a_file_inside_the_root_is_allowed(layout):
    root, ok, _ = layout
    assert source_refusal(str(ok), (str(root),)) is None
    assert _untouched(ok)


@pytest.mark.parametrize("variant", ["absolute", "dotdot", "file-url-dotdot", "symlink-in-root", "symlinked-dir",
                                     "sibling-prefix", "etc-passwd"])
def test_escapes_are_refused_and_nothing_is_read(layout, variant):
    root, _, secret = layout
    if variant == "absolute":
        source = str(secret)
    elif variant == "dotdot":
        source = f"{root}/../private/id_ed25519"
    elif variant == "file-url-dotdot":
        source = f"file://{root}/%2e%2e/private/id_ed25519"
    elif variant == "symlink-in-root":
        (root / "model.gguf").symlink_to(secret)
        source = str(root / "model.gguf")
    elif variant == "symlinked-dir":
        (root / "sub").symlink_to(secret.parent, target_is_directory=True)
        source = str(root / "sub" / "id_ed25519")
    elif variant == "sibling-prefix":
        sibling = _trap(Path(f"{root}-evil") / "m.gguf")
        secret, source = sibling, str(sibling)
    else:
        source = "/etc/passwd"
    model = model_doc(source=source)
    outcome = evaluate(isvc_doc(), model)
    if "dotdot" in variant:
        # The parser already refuses '..' segments; the root check would too, resolved.
        assert not isinstance(outcome, Parsed) and outcome.paths() == ("spec.source",)
        assert source_refusal(f"{root}/../private/id_ed25519", (str(root),)) is not None
    else:
        assert isinstance(outcome, Parsed)  # the spec itself is well formed ...
        errors = workload_refusals(outcome.value, model, (str(root),))  # ... but its source is not served
        assert [e.reason for e in errors] == ["SourceNotAllowed"] and errors[0].security
        assert str(root) in errors[0].message
    if variant != "etc-passwd":
        assert _untouched(secret)


def test_a_root_that_is_itself_a_symlink_is_resolved_on_both_sides(tmp_path):
    real = tmp_path / "real-models"
    real.mkdir()
    ok = _trap(real / "m.gguf")
    link = tmp_path / "models-link"
    link.symlink_to(real, target_is_directory=True)
    assert source_refusal(str(ok), (str(link),)) is None  # real path under a symlinked root
    assert source_refusal(str(link / "m.gguf"), (str(real),)) is None  # symlinked path under the real root
    outside = _trap(tmp_path / "elsewhere" / "x.gguf")
    assert source_refusal(str(outside), (str(link),)) is not None
    assert _untouched(ok) and _untouched(outside)


def test_case_is_never_folded_by_spelling_only_by_file_identity(tmp_path):
    # On a case-sensitive volume /Models and /models are different folders: never "inside".
    root = tmp_path / "models"
    root.mkdir()
    other = _trap(tmp_path / "MODELS" / "x.gguf")
    assert source_refusal(str(other), (str(root),)) is not None
    # On case-insensitive APFS the other spelling is the same folder: the same (dev, inode).
    same = Resolved("/Users/me/MODELS/x.gguf", ((1, 20), (1, 10), (1, 2), (1, 1)))
    assert inside(same, Resolved("/Users/me/models", ((1, 10), (1, 2), (1, 1))))
    assert not inside(same, Resolved("/Users/me/other", ((1, 11), (1, 2), (1, 1))))


def test_a_missing_root_admits_nothing_beside_it(tmp_path):
    # The identity of a missing root's nearest ancestor must not stand for the root.
    _trap(tmp_path / "x.gguf")
    assert source_refusal(str(tmp_path / "x.gguf"), (str(tmp_path / "absent"),)) is not None


def test_the_default_root_is_the_model_store_alone(tmp_path):
    policy = build_policy([], [], tmp_path / "store")
    assert policy.model_roots == (str(tmp_path / "store"),)
    assert build_policy([], ["/a,/b", "/c"], tmp_path).model_roots == ("/a", "/b", "/c")
    with pytest.raises(ValueError, match="absolute"):
        build_policy([], ["relative/dir"], tmp_path)


def test_a_source_llmkube_refused_is_not_served(tmp_path):
    model = model_doc(source=f"file://{_trap(tmp_path / 'm.gguf')}")
    model["metadata"]["generation"] = 2
    model["status"] = {"phase": "Failed", "conditions": [{
        "type": "Degraded", "status": "True", "reason": "SourceNotAllowed", "observedGeneration": 2,
        "message": "local model source is not within any allowed root [/models]"}]}
    why = source_refused(model)
    assert why and "SourceNotAllowed" in why and "--allowed-host-path-roots" in why
    outcome = evaluate(isvc_doc(), model)
    errors = workload_refusals(outcome.value, model, (str(tmp_path),))
    assert [e.reason for e in errors] == ["SourceNotAllowed"]
    # A verdict on an older generation of the Model is stale: the controller has not seen this spec.
    model["metadata"]["generation"] = 3
    assert source_refused(model) is None
    # So is one left beside phase Ready (the operator widened its roots; not every path clears Degraded).
    model["metadata"]["generation"] = 2
    model["status"]["phase"] = "Ready"
    assert source_refused(model) is None


def test_render_refuses_a_source_outside_the_roots_and_takes_the_flag(tmp_path):
    secret = _trap(tmp_path / "private" / "key")
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all([isvc_doc(), model_doc(source=f"file://{secret}")]))
    base = [sys.executable, "-m", "metal_agent", "render", "-f", str(tmp_path / "all.yaml"), "--threads", "2",
            "--model-dir", str(tmp_path / "store")]
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("SourceNotAllowed: Model default/tiny: spec.source")
    allowed = subprocess.run([*base, "--allowed-model-roots", str(secret.parent)], capture_output=True, text=True,
                             timeout=120)
    assert allowed.returncode == 0, allowed.stderr
    assert _untouched(secret)


@pytest.mark.parametrize("member", ["files", "mmproj"])
def test_a_file_of_a_set_linked_out_of_the_roots_is_refused(layout, member):
    """`spec.files` names are checked (no `..`, no leading `/`), but a name inside the root may be a
    symbolic link out of it: each file of a local set is resolved like the source itself."""
    root, _, secret = layout
    _trap(root / "set" / "m-00001-of-00002.gguf")
    _trap(root / "set" / "m-00002-of-00002.gguf")
    (root / "set" / "linked.gguf").symlink_to(secret)
    files = ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    spec = {"files": files + ["linked.gguf"]} if member == "files" else {"files": files, "mmproj": "linked.gguf"}
    outcome = evaluate(isvc_doc(), model_doc(source=f"file://{root / 'set'}", **spec))
    assert isinstance(outcome, Parsed), outcome
    errors = workload_refusals(outcome.value, None, (str(root),))
    assert [(e.path, e.reason) for e in errors] == [("spec.source", "SourceNotAllowed")]
    clean = evaluate(isvc_doc(), model_doc(source=f"file://{root / 'set'}", files=files))
    assert workload_refusals(clean.value, None, (str(root),)) == ()
    assert _untouched(secret)
