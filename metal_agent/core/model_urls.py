"""Where a Model's file is fetched from, and how its URL may be shown (pure).

Why its own module: the downloader, the model store, the MLX snapshots and
`metal-agent migrate` all turn an `hf://` or `http(s)://` source into the
same URL, and all must show it without the credentials signed URLs carry.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from metal_agent.core.api import ModelSource, SourceKind
from metal_agent.core.status import Blocker

#: The hub `hf://` sources resolve against (HF_ENDPOINT in the environment names a mirror).
HF_ENDPOINT = "https://huggingface.co"


def resolve_source(source: ModelSource, hf_endpoint: str = HF_ENDPOINT) -> str | Blocker:
    """The HTTPS URL to fetch for an `http(s)://` or `hf://` source.

    `hf://org/repo/path/file.gguf` → `<endpoint>/org/repo/resolve/main/path/file.gguf`;
    a revision goes on the repository: `hf://org/repo@v1.0/file.gguf` (branch,
    tag or commit; a revision containing "/" must be percent-encoded).
    """
    if source.kind is SourceKind.HTTP:
        return source.raw
    if source.kind is not SourceKind.HUGGINGFACE:
        return Blocker("ModelSourceUnsupported", f"{source.kind.value} sources are not downloaded")
    rest = source.raw.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 3:
        return Blocker("ModelSourceInvalid",
                       f"source {source.raw!r} names a repository, not a file; use hf://org/repo/path/model.gguf")
    org, repo, path = parts[0], parts[1], parts[2:]
    revision = "main"
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        if not repo or not revision:
            return Blocker("ModelSourceInvalid", f"source {source.raw!r}: write a revision as hf://org/repo@revision/file")
    return f"{hf_endpoint.rstrip('/')}/{org}/{repo}/resolve/{quote(revision, safe='%')}/{'/'.join(path)}"


def redact(url: str) -> str:
    """The URL for logs and messages: no user-info, no query (signed URLs carry credentials there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
