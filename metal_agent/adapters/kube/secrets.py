"""Read the download token a Model names in `spec.sourceSecretRef`.

The agent's ClusterRole grants nothing on Secrets; a cluster admin who wants
gated downloads grants `get` on the named Secrets only
(manifests/rbac/optional-model-secret-reader.yaml). So this reader does
exactly one thing: `get` one Secret by name, in the Model's namespace, when
a download starts, and return one decoded key. It never lists or watches, and
nothing it raises or logs contains the token: errors name the Secret and the
key, never the value.
"""

from __future__ import annotations

import base64
import binascii

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.adapters.downloads import TokenUnavailable
from metal_agent.core.api import SecretRef
from metal_agent.core.status import Blocker

log = structlog.get_logger(__name__)

RBAC_HINT = "manifests/rbac/optional-model-secret-reader.yaml"


class SecretTokenReader:
    """An async `token_provider(namespace, secret_ref) -> str | None` for `ModelFiles`."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)

    async def __call__(self, namespace: str, ref: SecretRef) -> str | None:
        where = f"{namespace}/{ref.name}"
        try:
            secret = await self.core.read_namespaced_secret(ref.name, namespace)
        except ApiException as err:
            if err.status == 403:
                raise TokenUnavailable(Blocker(
                    "ModelSecretForbidden",
                    f"the agent's role may not read Secret {where} (named by the Model's spec.sourceSecretRef); "
                    f"grant `get` on it, see {RBAC_HINT}")) from None
            if err.status == 404:
                raise TokenUnavailable(Blocker(
                    "ModelSecretNotFound",
                    f"Secret {where} named by the Model's spec.sourceSecretRef does not exist")) from None
            raise TokenUnavailable(Blocker(
                "ModelSecretUnavailable", f"cannot read Secret {where}: HTTP {err.status} {err.reason or ''}".rstrip()),
                retryable=True) from None
        encoded = (secret.data or {}).get(ref.key)
        if encoded is None:
            raise TokenUnavailable(Blocker(
                "ModelSecretInvalid", f"Secret {where} has no key {ref.key!r} (spec.sourceSecretRef.key)"))
        try:
            token = base64.b64decode(encoded, validate=True).decode("utf-8").strip()
        except (binascii.Error, UnicodeDecodeError):
            raise TokenUnavailable(Blocker(
                "ModelSecretInvalid", f"key {ref.key!r} of Secret {where} is not a UTF-8 text token")) from None
        if not token:
            raise TokenUnavailable(Blocker("ModelSecretInvalid", f"key {ref.key!r} of Secret {where} is empty"))
        if any(ch.isspace() or not ch.isprintable() for ch in token):
            # It would break (or smuggle) HTTP headers; say so without echoing it.
            raise TokenUnavailable(Blocker(
                "ModelSecretInvalid", f"key {ref.key!r} of Secret {where} holds whitespace or control characters"))
        log.debug("read download token", secret=where, key=ref.key)
        return token
