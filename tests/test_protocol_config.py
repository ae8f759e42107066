"""The shipped configs give each of the paper's datasets the official background rule (issue 11 points 1-3), in the
toy world (config.yaml) and the paper run (configs/paper.yaml merged over it, as `--configfile config.yaml
configs/paper.yaml` merges them).

Reference: the official code's dataset definitions, as docs/method.md#prompts-and-token-spans describes them: voc21.json puts background last; COCO-Object's open-vocabulary
json keeps background (label 0) as a class whose pixels are ignored (ignore_label 0); VOC20 and PC59 open-vocabulary
have no background class; the unsupervised PC59 and COCO-Object include it as a class (paper section 4.2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from seg4diff_repro.config import apply_defaults, load_schema

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"

# `appendix.datasets` role -> the official background rule (datasets.layout.BACKGROUND_MODES).
OFFICIAL_BACKGROUND = {
    "voc20": "drop",
    "pc59": "drop",
    "voc21": "last",
    "coco_object": "ignore",
    "coco_object_bg": "class",
    "pc59_bg": "class",
}

# Prepared toy-world sets without a background class (datasets.toy_world: background_index null).
NO_BACKGROUND_SETS = {"toy_world_scenes", "toy_world_stuff"}


def shipped_config(*overlays: str) -> dict:
    """config.yaml with each overlay merged over it the way Snakemake merges config files, schema defaults filled."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for overlay in overlays:
        update_config(config, yaml.safe_load((REPO / overlay).read_text()))
    return apply_defaults(config, load_schema(SCHEMA))


@pytest.mark.parametrize("overlays", [(), ("configs/paper.yaml",)], ids=["toy world", "paper config"])
def test_every_role_gets_the_official_background_rule(overlays):
    config = shipped_config(*overlays)
    views = {role: config["appendix"]["datasets"][role] for role in OFFICIAL_BACKGROUND}
    rules = {role: config["datasets"][view]["background"] for role, view in views.items()}
    # A toy-world set drawn without a background class (the scenes preset, standing in for PC59 as the scene-parsing
    # sets do) has nothing to drop: `class` is the only mode its reader accepts, and the view then matches both of
    # PC59's rules (no background class in the open-vocabulary protocol, every pixel a class in the unsupervised one).
    expected = {
        role: "class" if config["datasets"][views[role]]["prepared"] in NO_BACKGROUND_SETS else rule
        for role, rule in OFFICIAL_BACKGROUND.items()
    }
    assert rules == expected, views


def test_the_paper_config_maps_every_role_to_the_real_dataset_of_that_name():
    # So that the check above is about the real views in the paper run, not the toy stand-ins left in place.
    toy, paper = shipped_config(), shipped_config("configs/paper.yaml")
    assert {role: paper["appendix"]["datasets"][role] for role in OFFICIAL_BACKGROUND} == {
        role: role for role in OFFICIAL_BACKGROUND}
    assert {toy["datasets"][toy["appendix"]["datasets"][role]]["prepared"] for role in OFFICIAL_BACKGROUND} <= {
        "toy_world_objects", "toy_world_crowd", "toy_world_scenes", "toy_world_stuff"}
    assert paper["datasets"]["pc59_bg"]["scored_classes"] == 59  # the official N_CLASS of pc59.json


def test_the_alternatives_config_flips_each_switched_point_and_writes_its_own_folder():
    """configs/protocol_alternatives.yaml (docs/method.md, "Protocol points") gives the other behaviour of every
    switched point, and never the toy world's output folder."""
    default, other = shipped_config(), shipped_config("configs/protocol_alternatives.yaml")
    assert other["outputs"]["namespace"] not in ("toy", default["outputs"]["namespace"])

    def background(config: dict, role: str) -> str:
        return config["datasets"][config["appendix"]["datasets"][role]]["background"]

    for role in ("coco_object", "voc21"):
        assert background(other, role) != background(default, role) == OFFICIAL_BACKGROUND[role]
    # PC59's stand-in has no background class in the toy world (the scenes preset): nothing to flip there.
    assert default["datasets"][default["appendix"]["datasets"]["pc59_bg"]]["prepared"] in NO_BACKGROUND_SETS
    assert other["attention"]["prompt_classes_from"] != default["attention"]["prompt_classes_from"] == "resized"
    steps = [config["analyses"]["attention_figures"]["step_convention"] for config in (default, other)]
    assert steps == ["paper", "official"]
