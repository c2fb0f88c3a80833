"""Recipe validation: unknown keys and bad values name the field; the hash is stable."""

from __future__ import annotations

import pytest

from pipeline.errors import LaminaError
from pipeline.recipe import parse
from tests.conftest import recipe_doc


def test_unknown_key_is_named(tmp_path) -> None:
    with pytest.raises(LaminaError, match=r"scheme\.colour: unknown key"):
        parse(recipe_doc(tmp_path, scheme={"colour": "blue"}))


def test_bad_value_is_named(tmp_path) -> None:
    with pytest.raises(LaminaError, match=r"scheme\.bits: Input should be 2, 3, 4 or 8"):
        parse(recipe_doc(tmp_path, scheme={"bits": 5}))
    with pytest.raises(LaminaError, match=r"scheme\.group_size: .*power of two"):
        parse(recipe_doc(tmp_path, scheme={"group_size": 96}))


def test_missing_required_field_is_named() -> None:
    with pytest.raises(LaminaError, match="model: Field required"):
        parse({"output": "x"})


def test_hash_depends_on_the_scheme_not_on_resources_or_output(tmp_path) -> None:
    base = parse(recipe_doc(tmp_path)).hash()
    assert parse(recipe_doc(tmp_path, resources={"workers": 1})).hash() == base
    assert parse(recipe_doc(tmp_path, output=str(tmp_path / "elsewhere"))).hash() == base
    assert parse(recipe_doc(tmp_path, scheme={"sym": False})).hash() != base
