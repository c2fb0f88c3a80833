"""Filesystem options per URI prefix: the recipe's `storage:` section.

    storage:
      s3://models:
        endpoint_url: https://minio.internal:9000
        key: ${env:MINIO_KEY}
        secret: ${env:MINIO_SECRET}
        client_kwargs: {region_name: eu-west-1}

Values are passed to the fsspec filesystem of every URI under the prefix (the longest
prefix wins). Secrets are never written in the recipe: a credential-like key must hold a
`${env:NAME}` reference, resolved from the environment of the process that configures
storage (the driver), so the recipe, the manifest and the logs only ever name the variable.
"""

from __future__ import annotations

import os
import re

from storage.fs import StorageError

ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "passphrase", "signature")
NOT_SECRET = {"endpoint_url", "region_name", "key_prefix"}

_configured: dict[str, dict] = {}


def literal_secrets(options: object, where: str = "") -> list[str]:
    """Dotted names of credential-like keys whose value is written out instead of referenced."""
    found = []
    if isinstance(options, dict):
        for key, value in options.items():
            name = f"{where}.{key}" if where else str(key)
            secret = str(key).lower() not in NOT_SECRET and any(w in str(key).lower() for w in SECRET_WORDS)
            if secret and isinstance(value, str) and not ENV_REF.fullmatch(value) and value != "anon":
                found.append(name)
            found += literal_secrets(value, name)
    return found


def resolve(value: object, where: str = "storage") -> object:
    """Replace every ${env:NAME} by the variable's value; a missing variable is an error
    that names it (never a value)."""
    if isinstance(value, dict):
        return {k: resolve(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, where) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise StorageError(f"{where}: environment variable {name} is not set")
        return os.environ[name]

    return ENV_REF.sub(lookup, value)


def configure(section: dict[str, dict], *, resolved: bool = False) -> None:
    """Use these options for URIs under each prefix in this process (replaces earlier ones)."""
    global _configured
    _configured = {
        p if p.endswith(("://", "::")) else p.rstrip("/"): dict(o if resolved else resolve(o, f"storage.{p}"))
        for p, o in section.items()
    }


def configured() -> dict[str, dict]:
    """The resolved options, to hand to worker processes (kept out of logs and reprs)."""
    return {p: dict(o) for p, o in _configured.items()}


def under(uri: str, prefix: str) -> bool:
    if prefix.endswith(("://", "::")):
        return uri.startswith(prefix)
    return uri == prefix or uri.startswith(prefix + "/")


def options_for(uri: str) -> dict:
    matches = [p for p in _configured if under(uri, p)]
    return dict(_configured[max(matches, key=len)]) if matches else {}
