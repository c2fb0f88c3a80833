"""Vendor the schemas of KubeRay's RayCluster and RayJob for tests/test_infra_k8s.py: the
`openAPIV3Schema` of version v1 of each CRD at a tag, as sorted, compact JSON, gzipped with no
timestamp (the same tag gives the same bytes).

    git clone --bare https://github.com/ray-project/kuberay /tmp/kuberay.git
    python tests/schemas/extract_kuberay.py /tmp/kuberay.git v1.7.0

writes tests/schemas/kuberay-v1.7.0/{rayclusters,rayjobs}.json.gz and prints the tag's commit.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
from pathlib import Path

import yaml

CRDS = {
    "rayclusters": "ray-operator/config/crd/bases/ray.io_rayclusters.yaml",
    "rayjobs": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml",
}
HERE = Path(__file__).resolve().parent


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=True).stdout


def crd_schema(repo: str, tag: str, path: str, version: str = "v1") -> dict:
    crd = yaml.load(git(repo, "show", f"{tag}:{path}"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("repo", help="a clone of github.com/ray-project/kuberay (bare or not)")
    p.add_argument("tag", help="a release tag, e.g. v1.7.0")
    args = p.parse_args(argv)
    out = HERE / f"kuberay-{args.tag}"
    out.mkdir(exist_ok=True)
    for name, path in CRDS.items():
        data = json.dumps(crd_schema(args.repo, args.tag, path), sort_keys=True, separators=(",", ":"))
        (out / f"{name}.json.gz").write_bytes(gzip.compress(data.encode(), compresslevel=9, mtime=0))
    print(f"{args.tag}: commit {git(args.repo, 'rev-parse', args.tag + '^{commit}').strip()}")


if __name__ == "__main__":
    main()
