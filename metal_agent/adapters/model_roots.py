"""Resolve local model sources and the allowed roots on this Mac's disk (`core.model_roots` decides).

Blocking file-system calls (realpath, stat): a handful per check, on paths
the agent is about to open anyway; called where the reconciler already
stats the model file.

What this cannot catch: a hard link inside an allowed root to a file
elsewhere is the same file as far as the file system can tell; only someone
who can already write inside the root (the Mac's owner) can make one.
Between this check and llama-server opening the file a symlink could be
swapped by someone with write access inside the root, the same person.
"""

from __future__ import annotations

import os

from metal_agent.core.model_roots import Resolved, refusal
from metal_agent.core.result import FieldError
from metal_agent.core.spec_policy import SOURCE_NOT_ALLOWED
from metal_agent.core.status_owner import source_refused


def resolve(path: str) -> Resolved:
    real = os.path.realpath(path)
    identities = []
    current = real
    while True:
        try:
            st = os.stat(current)
            identities.append((st.st_dev, st.st_ino))
        except OSError:
            pass
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return Resolved(real, tuple(identities))


def source_refusal(source: str, roots: tuple[str, ...]) -> str | None:
    """Why the local source `source` may not be served under `roots`, or None."""
    resolved_roots = tuple(resolve(root) for root in roots if os.path.isabs(root))
    # A root's own identity is the first entry only when the root itself exists.
    resolved_roots = tuple(r if os.path.exists(r.path) else Resolved(r.path) for r in resolved_roots)
    return refusal(source, resolve(source), resolved_roots, roots)


def workload_refusals(workload, model_raw: dict | None, roots: tuple[str, ...]) -> tuple[FieldError, ...]:
    """Every reason not to serve `workload`'s model files: a local source (the model's or its
    draft's) outside `roots`, or a source LLMKube's Model controller refused. The one check
    the agent and `metal-agent render` share."""
    errors = []
    for model in (workload.model, workload.draft):
        path = model.spec.source.local_path if model is not None else None
        if path is None:
            continue
        # Each file of a set too: one may be a symbolic link out of the roots.
        members = [os.path.join(path, name) for name in (*model.spec.files, model.spec.mmproj) if name]
        why = next((w for p in (path, *members) if (w := source_refusal(p, roots))), None)
        if why:
            errors.append(FieldError("spec.source", why, "Model", model.meta.key, SOURCE_NOT_ALLOWED, True))
    if why := source_refused(model_raw):
        errors.append(FieldError("spec.source", why, "Model", workload.model.meta.key, SOURCE_NOT_ALLOWED, True))
    return tuple(errors)
