from pathlib import Path

import pytest

from deepsynth.render import PRESETS
from deepsynth.training.config import TrainerConfig

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    config = TrainerConfig.from_yaml(path)
    assert config.render_preset in PRESETS
