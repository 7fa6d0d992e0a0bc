"""Is a local model source inside the folders this Mac's owner allows? The decision, without I/O.

The adapter (`adapters.model_roots`) resolves the source and each root with
symlinks (realpath) and reads their file identities; this module only decides
from those facts, so the rule is testable on its own:

* a source is inside a root when the root is one of its resolved path's
  ancestors (or the path itself): by path prefix on whole components, or by
  file identity (device, inode) of an ancestor, which is what makes a
  differently-cased spelling on case-insensitive APFS count as the same
  folder without ever folding case on a case-sensitive volume (where
  `/Models` and `/models` are different folders);
* `..` and symlinks are gone after resolution, so neither can lead out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Resolved:
    """A path with its symlinks resolved, and the identities of it and of each of its ancestors."""

    path: str
    identities: tuple[tuple[int, int], ...] = ()  # (st_dev, st_ino) of the path and its ancestors that exist


def _components_under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root == "/" else root + "/")


def inside(source: Resolved, root: Resolved) -> bool:
    if _components_under(source.path, root.path):
        return True
    root_id = root.identities[0] if root.identities else None
    return root_id is not None and root_id in source.identities


def refusal(source: str, resolved: Resolved, roots: tuple[Resolved, ...], given: tuple[str, ...]) -> str | None:
    """Why `source` may not be served (a message naming the allowed roots), or None if it may."""
    if any(inside(resolved, root) for root in roots):
        return None
    shown = ", ".join(given) if given else "(none)"
    where = f" (resolves to {resolved.path})" if resolved.path != source else ""
    return (f"{source}{where} is outside the folders this Mac serves models from: {shown}. Put the model in one"
            " of them, use an hf:// or https:// source, or ask the Mac's owner to add its folder with"
            " `metal-agent run --allowed-model-roots`")
