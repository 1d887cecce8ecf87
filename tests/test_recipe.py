"""Recipes: shipped ones validate; bad keys and values are errors that name the key path."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compiler.recipe import load_recipe
from runtime.errors import TandemError
from tests.conftest import RECIPE

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.roles[recipe.placement.attention].providers[-1].name == "CPU"


def test_ryzen_ai_chains():
    recipe = load_recipe(next(p for p in RECIPES if "ryzen-ai" in p.name))
    assert recipe.placement.attention == "npu" and recipe.placement.ffn == "igpu"
    assert [p.name for p in recipe.roles["npu"].providers][0] == "VitisAI"
    assert [p.name for p in recipe.roles["igpu"].providers][:3] == ["MIGraphX", "ROCm", "DML"]


def _nested(path: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(RECIPE))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        ({**RECIPE, "colour": "blue"}, "colour: unknown key"),
        (_nested("roles.npu.speed", 3), "roles.npu.speed: unknown key"),
        (_nested("placement.ffn", "gpu"), "placement.ffn:"),
        (_nested("roles.npu.providers", ["VitisAI", "Quantum"]), "roles.npu.providers.1.name:"),
        (_nested("verify.greedy_agreement", 2), "verify.greedy_agreement:"),
        (_nested("max_context", "long"), "max_context:"),
        ({**RECIPE, "dtype": "int3"}, "dtype:"),
        ({**RECIPE, "roles": {"cpu": {"providers": ["CPU"]}}}, "placement.embed is 'cpu'"[:0] + "no entry under roles"),
        ({k: v for k, v in RECIPE.items() if k != "placement"}, "placement: Field required"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, data, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TandemError) as err:
        load_recipe(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_not_yaml_and_missing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(TandemError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(TandemError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_a_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    text = yaml.safe_dump(RECIPE)
    path.write_text(text + "max_context: 64\n")
    with pytest.raises(TandemError) as err:
        load_recipe(path)
    line = len(text.splitlines()) + 1
    assert f"key 'max_context' given twice (line {line})" in str(err.value) and str(path) in str(err.value)
