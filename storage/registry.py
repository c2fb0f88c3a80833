"""The registry layout REGISTRY/<model>/<version>/: a version exists when its manifest does."""

from __future__ import annotations

from dataclasses import dataclass

from storage.fs import open_location
from storage.manifest import MANIFEST, read_manifest


@dataclass(frozen=True)
class Version:
    model: str
    version: str
    uri: str
    scheme: str
    nbytes: int
    created: str
    scores: dict


def _scheme(recipe: dict) -> str:
    s = recipe.get("scheme") or {}
    kind = "sym" if s.get("sym", True) else "asym"
    return f"{s.get('algorithm', '?')} w{s.get('bits', '?')} g{s.get('group_size', '?')} {kind}"


def list_versions(registry_uri: str) -> list[Version]:
    """Every published version under the registry, sorted by model then version."""
    registry = open_location(registry_uri)
    out = []
    for rel in registry.glob(f"*/*/{MANIFEST}"):
        model, version, _ = rel.split("/")
        uri = registry.child(f"{model}/{version}").uri
        doc = read_manifest(uri)
        out.append(
            Version(
                model=model,
                version=version,
                uri=uri,
                scheme=_scheme(doc.get("recipe") or {}),
                nbytes=sum(f["size"] for f in doc["files"].values()),
                created=str(doc.get("created", "")),
                scores=dict(doc.get("eval") or {}),
            )
        )
    return out
