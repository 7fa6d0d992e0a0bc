"""An object's metadata (name, namespace, uid, generation) and Kubernetes' name rules, for either kind.

Separate from the reader because it is the one part both kinds share that
has Kubernetes' own rules (DNS-1123 names) rather than LLMKube's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metal_agent.core.api import ObjectMeta
from metal_agent.core.names import is_dns1123_label, is_dns1123_subdomain
from metal_agent.core.spec_reader import Reader, describe

DEFAULT_NAMESPACE = "default"


def display_name(raw: Any) -> str:
    """Best-effort "namespace/name" for error prefixes, even for broken objects."""
    meta = raw.get("metadata") if isinstance(raw, Mapping) else None
    if not isinstance(meta, Mapping):
        return ""
    name = meta.get("name")
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    if not isinstance(name, str) or not isinstance(namespace, str):
        return ""
    return f"{namespace}/{name}"


def read_meta(r: Reader, raw: Mapping[str, Any]) -> ObjectMeta:
    meta = r.mapping(raw, "metadata", "metadata", required=True)
    name = r.string(meta, "name", "metadata.name", required=meta is not None) or ""
    if name:
        check_subdomain(r, name, "metadata.name")
    elif meta is not None and "name" in meta and isinstance(meta["name"], str):
        r.error("metadata.name", "must not be empty")
    namespace = r.string(meta, "namespace", "metadata.namespace")
    if namespace:
        check_label(r, namespace, "metadata.namespace")
    uid = r.string(meta, "uid", "metadata.uid") or None
    generation = r.optional_integer(meta, "generation", "metadata.generation", minimum=0, maximum=2**63 - 1)
    resource_version = r.string(meta, "resourceVersion", "metadata.resourceVersion") or None
    return ObjectMeta(
        namespace=namespace or DEFAULT_NAMESPACE,
        name=name,
        uid=uid,
        generation=generation,
        resource_version=resource_version,
    )


def check_subdomain(r: Reader, value: str, path: str) -> None:
    """DNS-1123 subdomain: what Kubernetes requires of most object names."""
    if len(value) > 253:
        r.error(path, f"must be at most 253 characters, got {len(value)}")
    elif not is_dns1123_subdomain(value):
        r.error(
            path,
            f"{value!r} is not a valid name: use lower-case letters, digits, '-' and '.',"
            " starting and ending with a letter or digit",
        )


def check_label(r: Reader, value: str, path: str) -> None:
    """DNS-1123 label: what Kubernetes requires of namespace names."""
    if len(value) > 63:
        r.error(path, f"must be at most 63 characters, got {len(value)}")
    elif not is_dns1123_label(value):
        r.error(
            path,
            f"{value!r} is not a valid namespace: use lower-case letters, digits and '-',"
            " starting and ending with a letter or digit",
        )


def top_level(r: Reader, raw: Any) -> Mapping[str, Any] | None:
    if not isinstance(raw, Mapping):
        r.error("<root>", f"expected an object, got {describe(raw)}")
        return None
    return raw
