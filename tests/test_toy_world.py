"""The harder toy world (issue 16): its presets' vocabularies and background rules, captions that match the labels,
colours that do not decide the class, determinism across worker counts, and the class-name prompts of its
training set."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from seg4diff_repro.datasets import SegmentationDataset
from seg4diff_repro.datasets.toy_world import (
    BACKGROUND,
    COLOURS,
    PRESET_NAMES,
    STUFF,
    THINGS,
    TOY_CLASS_NAMES,
    TOY_PRESETS,
    generate_toy_world,
)
from seg4diff_repro.models.train_toy import class_name_prompt


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "manifest.json":  # the manifest records the creation time
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy_world")
    for preset in PRESET_NAMES:
        generate_toy_world(root / preset, preset=preset, n_train=0, n_val=40, seed=0)
    return {preset: root / preset for preset in PRESET_NAMES}


def test_same_set_for_any_number_of_workers_and_another_for_another_seed(world, tmp_path) -> None:
    generate_toy_world(tmp_path / "two", preset="objects", n_train=0, n_val=40, seed=0, workers=2)
    assert _digest(tmp_path / "two") == _digest(world["objects"])
    generate_toy_world(tmp_path / "other", preset="objects", n_train=0, n_val=40, seed=1)
    assert _digest(tmp_path / "other") != _digest(world["objects"])


@pytest.mark.parametrize("preset", list(TOY_PRESETS))
def test_each_preset_has_its_vocabulary_and_background_rule(world, preset: str) -> None:
    classes = json.loads((world[preset] / "classes.json").read_text())
    spec = TOY_PRESETS[preset]
    has_background = spec.stuff == (0, 0)
    assert (classes["background_index"] == 0) is has_background
    assert classes["names"] == ([BACKGROUND, *THINGS] if has_background else [*THINGS, *STUFF])
    dataset = SegmentationDataset(world[preset], "val")
    things_per_image = []
    for sample in dataset:
        values = set(np.unique(sample.label).tolist()) - {classes["ignore_index"]}
        assert values <= set(range(len(classes["names"])))
        if not has_background:  # every pixel is a stuff region or an object (or the ignore band)
            assert any(classes["names"][v] in STUFF for v in values)
        things_per_image.append(sum(classes["names"][v] in THINGS for v in values))
    assert spec.things[0] <= min(things_per_image) and max(things_per_image) <= spec.things[1]


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_captions_name_exactly_the_classes_in_the_label(world, preset: str) -> None:
    dataset = SegmentationDataset(world[preset], "val")
    for sample in dataset:
        words = set(sample.caption.replace(",", " ").split())
        present = {dataset.class_names[v] for v in np.unique(sample.label).tolist() if v < len(dataset.class_names)}
        assert words & set(THINGS + STUFF) == present - {BACKGROUND}, (sample.image_id, sample.caption)


def test_colour_does_not_decide_the_class(world) -> None:
    """Reference: the pixels of a one-object image; every thing class shows up in several colours, and the colour a
    caption names is the object's (its pixels are nearest that palette colour, stripes and dots aside)."""
    colours_seen = defaultdict(set)
    palette = {name: np.array(rgb, dtype=float) for name, rgb in COLOURS.items()}
    for preset in ("objects", "crowd", "mixed"):
        dataset = SegmentationDataset(world[preset], "val")
        for sample in dataset:
            words = sample.caption.replace(",", " ").split()
            for i, word in enumerate(words):
                if word in THINGS:
                    colours_seen[word].add(words[i - 1])
            things = [v for v in np.unique(sample.label).tolist() if dataset.class_names[v:v + 1] and dataset.class_names[v] in THINGS]
            if len(things) == 1:
                pixels = sample.image[sample.label == things[0]].astype(float)
                nearest = [min(palette, key=lambda n: np.linalg.norm(p - palette[n])) for p in pixels]
                colour = max(set(nearest), key=nearest.count)
                assert colour in words, (sample.image_id, sample.caption, colour)
    assert all(len(colours_seen[thing]) >= 3 for thing in THINGS), dict(colours_seen)


def test_mixed_set_draws_every_preset_in_one_vocabulary(world) -> None:
    classes = json.loads((world["mixed"] / "classes.json").read_text())
    assert classes["names"] == list(TOY_CLASS_NAMES)
    captions = json.loads((world["mixed"] / "captions.json").read_text()).values()
    assert any(" on " in c for c in captions) and any(" on " not in c and "a" in c.split() for c in captions)


def test_class_name_prompts_of_both_worlds() -> None:
    world = list(TOY_CLASS_NAMES)
    assert class_name_prompt("a striped red square and a blue circle", world) == "background circle square"
    assert class_name_prompt("a red circle on water and grass", world) == "circle grass water"
    assert class_name_prompt("sand and brick", world) == "brick sand"
    assert class_name_prompt("a photo", world) == "a photo"
    # toy-shapes (the committed model's world, no stuff classes): the background is never named
    assert class_name_prompt("a blue square and a red circle") == "circle square"


def test_bad_arguments_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown toy-world preset 'voc'"):
        generate_toy_world(tmp_path / "x", preset="voc")
    with pytest.raises(ValueError, match="image_size"):
        generate_toy_world(tmp_path / "x", image_size=16)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a toy-world dataset"):
        generate_toy_world(tmp_path / "mine", n_train=1, n_val=0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_make_toy_world_command_writes_the_prepared_layout(tmp_path) -> None:
    """`seg4diff-repro make-toy-world` (rule prepare_toy_world) writes the prepared layout the views read: classes.json
    with the preset's vocabulary and background rule, palette label PNGs in that vocabulary, the splits, the
    captions; the same set as the generator's, and the CLI's preset list is the generator's."""
    from PIL import Image

    from seg4diff_repro.cli import TOY_WORLD_PRESETS, main

    assert TOY_WORLD_PRESETS == PRESET_NAMES
    root = tmp_path / "toy_world_objects"
    main(["make-toy-world", "--root", str(root), "--preset", "objects", "--n-train", "3", "--n-val", "2",
          "--image-size", "64", "--seed", "0", "--workers", "1"])
    classes = json.loads((root / "classes.json").read_text())
    assert classes == {"names": [BACKGROUND, *THINGS], "ignore_index": 255, "background_index": 0}
    assert (root / "ImageSets/Segmentation/train.txt").read_text().split() == [f"toy_train_{i:05d}" for i in range(3)]
    assert (root / "ImageSets/Segmentation/val.txt").read_text().split() == ["toy_val_00000", "toy_val_00001"]
    label = Image.open(root / "SegmentationClass/toy_val_00000.png")
    assert label.mode == "P" and label.size == (64, 64)
    values = set(np.unique(np.asarray(label)).tolist())
    assert 0 in values and values <= set(range(len(classes["names"]))) | {255} and values - {0, 255}
    with Image.open(root / "JPEGImages/toy_val_00000.jpg") as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    captions = json.loads((root / "captions.json").read_text())
    assert set(captions) == {f"toy_train_{i:05d}" for i in range(3)} | {"toy_val_00000", "toy_val_00001"}
    view = SegmentationDataset(root, "val", background="drop")
    assert view.class_names == list(THINGS)
    generate_toy_world(tmp_path / "direct", preset="objects", n_train=3, n_val=2, image_size=64, seed=0)
    assert _digest(root) == _digest(tmp_path / "direct")
    # scenes: every pixel a class, no background class (so only background: class views of it)
    scenes = tmp_path / "toy_world_scenes"
    main(["make-toy-world", "--root", str(scenes), "--preset", "scenes", "--n-train", "0", "--n-val", "1"])
    assert json.loads((scenes / "classes.json").read_text())["background_index"] is None
    with pytest.raises(SystemExit):
        main(["make-toy-world", "--root", str(tmp_path / "x"), "--preset", "voc"])
