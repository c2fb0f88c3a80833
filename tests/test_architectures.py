"""The architectures table names classes that exist in the installed transformers."""

from __future__ import annotations

import pytest

from pipeline.architectures import ARCHITECTURES, layout_for
from pipeline.errors import LaminaError


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_layout_classes_exist(model_type: str) -> None:
    layout = ARCHITECTURES[model_type]
    module = layout.module()
    for name in (layout.layer_class, layout.rotary_class, layout.norm_class):
        assert isinstance(getattr(module, name), type)
    assert layout.group_of("self_attn.v_proj") == "self_attn.q_proj"


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(LaminaError, match="unsupported architecture 'gpt2'"):
        layout_for({"model_type": "gpt2"})
