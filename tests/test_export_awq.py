"""The AWQ export (GEMM layout) of an AWQ artifact, read back by AutoAWQ's own unpacking
(`awq.utils.packing_utils.dequantize_gemm`) to lamina's dequantized weights, and what the
format cannot hold refused before anything is written."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from algorithms.formats import AWQ_ORDER, awq_pack, awq_unpack
from pipeline.driver import quantize
from pipeline.errors import LaminaError
from pipeline.export import export
from pipeline.recipe import parse
from storage.fs import open_location
from storage.manifest import MANIFEST, verify
from tests.conftest import small_recipe_doc
from tests.test_export import native_weights


def autoawq_packing() -> ModuleType:
    """AutoAWQ's packing_utils.py, loaded from the installed package by its path: importing
    the `awq` package itself pulls its model zoo (datasets, ...), which the unpacking does not need."""
    path = importlib.metadata.distribution("autoawq").locate_file("awq/utils/packing_utils.py")
    spec = importlib.util.spec_from_file_location("autoawq_packing_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_nibble_order_is_autoawqs():
    packing = autoawq_packing()
    assert list(AWQ_ORDER) == packing.AWQ_ORDER
    codes = torch.randint(0, 16, (12, 64), generator=torch.Generator().manual_seed(0))
    words = awq_pack(codes)
    assert words.dtype == torch.int32 and words.shape == (12, 8)
    assert torch.equal(awq_unpack(words), codes.to(torch.int32))
    unpacked, _ = packing.reverse_awq_order(*packing.unpack_awq(words, words, 4), 4)
    assert torch.equal(unpacked.to(torch.int32) & 15, codes.to(torch.int32))
    with pytest.raises(ValueError, match="multiple of 8"):
        awq_pack(codes[:, :12])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, ray_cluster, small_model) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("export-awq")
    docs = {
        "awq": {
            **small_recipe_doc(tmp / "awq", small_model, scheme={"algorithm": "awq", "sym": False}),
            "export": [{"format": "awq", "output": str(tmp / "awq-export")}],
        },
        "rtn3": small_recipe_doc(tmp / "rtn3", small_model, scheme={"algorithm": "rtn", "bits": 3}),
        "partial": small_recipe_doc(
            tmp / "partial", small_model, scheme={"algorithm": "rtn", "group_size": 128, "unpackable": "partial"}
        ),
    }
    out = {}
    for name, doc in docs.items():
        report = quantize(parse(doc), progress=False)
        out[name] = report.output
        out.update({f"{name}-export": uri for uri in report.exports})
    return out


def test_autoawq_reads_the_export_back_to_our_weights(artifacts):
    folder = Path(open_location(artifacts["awq-export"]).root)
    assert verify(artifacts["awq-export"]) == []
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config == {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": 64,
        "zero_point": True,
        "modules_to_not_convert": ["lm_head"],
    }
    tensors = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    ours = native_weights(artifacts["awq"])
    packing = autoawq_packing()
    assert len(ours) == 4 * 7
    for linear, W in ours.items():
        qweight, qzeros, scales = (tensors[f"{linear}.{s}"] for s in ("qweight", "qzeros", "scales"))
        out, n = W.shape
        assert qweight.shape == (n, out // 8) and qzeros.shape == (n // 64, out // 8) and scales.shape == (n // 64, out)
        theirs = packing.dequantize_gemm(qweight, qzeros, scales, 4, 64)  # [in, out], float16
        torch.testing.assert_close(theirs.T.float(), W.half().float(), rtol=1e-3, atol=1e-3)
    # the smoothed norms travel with the export, unchanged
    native = Path(open_location(artifacts["awq"]).root)
    norms = {k: v for f in native.glob("*.safetensors") for k, v in load_file(f).items() if k.endswith("norm.weight")}
    assert norms and all(torch.equal(tensors[k], v) for k, v in norms.items())


def test_transformers_reads_the_awq_config(artifacts):
    from transformers import AutoConfig
    from transformers.utils.quantization_config import AwqConfig

    config = AutoConfig.from_pretrained(open_location(artifacts["awq-export"]).root)
    awq = AwqConfig.from_dict(config.quantization_config)
    assert (awq.bits, awq.group_size, awq.zero_point, awq.modules_to_not_convert) == (4, 64, True, ["lm_head"])


@pytest.mark.parametrize(
    ("name", "message"),
    [("rtn3", "4-bit grouped weights, not this artifact's 3-bit g64"), ("partial", "cannot hold a g_idx")],
)
def test_what_awq_cannot_hold_is_refused_before_anything_is_written(artifacts, tmp_path, name, message):
    dest = tmp_path / name
    with pytest.raises(LaminaError, match=message):
        export(artifacts[name], "awq", str(dest), progress=False)
    assert not (dest / MANIFEST).exists() and not any(dest.glob("*.safetensors"))


def test_a_recipe_cannot_ask_awq_of_what_it_cannot_hold(tmp_path, small_model):
    from pipeline.plan import make_plan

    doc = small_recipe_doc(tmp_path, small_model, scheme={"algorithm": "awq", "bits": 3})
    doc["export"] = [{"format": "awq", "output": str(tmp_path / "x")}]
    with pytest.raises(LaminaError, match="awq holds 4-bit grouped weights"):
        make_plan(parse(doc))
