"""The credential signing key: one Secret in the operator's namespace, generated on first start,
and its public key published as a ConfigMap where the services read it."""

from __future__ import annotations

import base64
import logging

from aar_common.credentials import generate_signing_key, public_key_pem
from aar_operator.config import OperatorConfig
from aar_operator.kube import ApiError, Kube, Ref

SECRET = "aar-credential-signing-key"
SECRET_KEY = "signing-key.pem"
CONFIG_MAP = "aar-credential-public-key"
CONFIG_MAP_KEY = "public-key.pem"

logger = logging.getLogger(__name__)


async def signing_key(kube: Kube, config: OperatorConfig) -> bytes:
    """The private key: from a file for local runs, else from (or into) the Secret."""
    if config.signing_key_file is not None:
        return config.signing_key_file.read_bytes()
    ref = Ref("v1", "Secret", config.namespace, SECRET)
    existing = await kube.get(ref)
    if existing is None:
        pem = generate_signing_key()
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": SECRET,
                "namespace": config.namespace,
                "labels": {
                    "app.kubernetes.io/part-of": "aar",
                    "app.kubernetes.io/managed-by": "aar-operator",
                },
            },
            "type": "Opaque",
            "data": {SECRET_KEY: base64.b64encode(pem).decode()},
        }
        try:
            await kube.create(secret)
            logger.info(f"Created Secret {config.namespace}/{SECRET} with a new signing key")
            return pem
        except ApiError as error:
            if error.status != 409:
                raise
            existing = await kube.get(ref)  # another operator process made it first
            assert existing is not None
    return base64.b64decode(existing["data"][SECRET_KEY])


async def publish_public_key(kube: Kube, config: OperatorConfig, pem: bytes) -> list[str]:
    """Create or update the public-key ConfigMap in each namespace; returns what failed."""
    public = public_key_pem(pem).decode()
    failures = []
    for namespace in dict.fromkeys([config.namespace, config.scorer_namespace]):
        config_map = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": CONFIG_MAP,
                "namespace": namespace,
                "labels": {
                    "app.kubernetes.io/part-of": "aar",
                    "app.kubernetes.io/managed-by": "aar-operator",
                },
            },
            "data": {CONFIG_MAP_KEY: public},
        }
        ref = Ref.of(config_map)
        try:
            current = await kube.get(ref)
            if current is None:
                await kube.create(config_map)
                logger.info(f"Created ConfigMap {namespace}/{CONFIG_MAP}")
            elif current.get("data", {}).get(CONFIG_MAP_KEY) != public:
                await kube.patch(ref, {"data": config_map["data"]})
                logger.info(f"Updated ConfigMap {namespace}/{CONFIG_MAP}")
        except ApiError as error:
            failures.append(f"ConfigMap {namespace}/{CONFIG_MAP}: {error}")
    return failures
