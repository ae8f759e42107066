"""Per-(layer, head) scoring (appendix Fig. 4) and the official unsupervised geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seg4diff_repro.attention.extract import ExtractionSettings, record_batch
from seg4diff_repro.datasets import SegmentationDataset, generate_toy_shapes
from seg4diff_repro.models.common import model_fingerprint
from seg4diff_repro.models.preprocess import crop_to_box, prepare_image
from seg4diff_repro.models.sd3 import SD3Adapter
from seg4diff_repro.models.tiny import write_tiny_sd3_pipeline
from seg4diff_repro.segmentation.heads import score_heads
from seg4diff_repro.segmentation.maps import class_score_maps, predict_labels, predict_labels_batch
from seg4diff_repro.segmentation.metrics import ConfusionMatrix, ConfusionMatrixStack
from seg4diff_repro.segmentation.overlays import _clusters_as_classes
from seg4diff_repro.segmentation.unsupervised import cluster_labels, official_cluster_labels


def test_batched_prediction_equals_the_per_map_prediction():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 3, 5, 7)).astype(np.float32)
    scores[0] = 0.0  # ties with the zero of absent classes
    scores[1] = -1.0  # every prompt class below zero: the first absent class wins
    class_ids = np.array([4, 1, 2])
    batched = predict_labels_batch(class_ids, torch.from_numpy(scores), 6, (11, 13)).numpy()
    for m in range(len(scores)):
        np.testing.assert_array_equal(batched[m], predict_labels(class_ids, scores[m], 6, (11, 13)))
    assert (batched[1] == 0).all() and (batched[0] == 0).all()


def test_confusion_stack_equals_separate_matrices():
    rng = np.random.default_rng(1)
    stack = ConfusionMatrixStack(3, 4, ignore_index=255)
    separate = [ConfusionMatrix(4, 255) for _ in range(3)]
    for _ in range(2):
        target = rng.integers(0, 4, size=(9, 8))
        target[0] = 255
        preds = rng.integers(0, 4, size=(3, 9, 8))
        stack.update(torch.from_numpy(preds), torch.from_numpy(target))
        for matrix, pred in zip(separate, preds):
            matrix.update(pred, target)
    for index, matrix in enumerate(separate):
        np.testing.assert_array_equal(stack[index].matrix, matrix.matrix)
    with pytest.raises(ValueError, match="outside"):
        stack.update(torch.full((3, 9, 8), 7), torch.zeros(9, 8, dtype=torch.long))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    write_tiny_sd3_pipeline(root / "model", seed=0)
    generate_toy_shapes(root / "data", n_train=1, n_val=3, seed=2)
    return root


def test_streamed_head_scores_equal_scoring_each_heads_map(world, tmp_path):
    settings = ExtractionSettings.from_dict(dict(
        model="tiny", dataset="toy", backbone="sd3", source=str(world / "model"), dtype="float32", timestep=8,
        num_steps=28, layers=[1, 2], seed=0, short_side=None, resize="stretch", prompt="oracle",
        background_name="background", split="val", background="last", limit=None,
    ))
    scores = score_heads(settings, world / "data", tmp_path / "shards", batch_size=2, shard_size=2)
    adapter = SD3Adapter.from_pretrained(world / "model")
    heads = adapter.transformer.config.num_attention_heads
    assert len(scores) == 2 * heads
    # By hand, image by image: the recorder's per-head maps through the cached-map scoring functions.
    dataset = SegmentationDataset(world / "data", "val", background="last")
    expected = {(layer, head): ConfusionMatrix(len(dataset.class_names)) for layer in (1, 2) for head in range(heads)}
    noising = adapter.noising(8, 28)
    for sample in dataset:
        batch = record_batch(adapter, [sample], dataset.class_names, settings, noising, [1, 2],
                             record=("i2t",), heads=None)
        prompt = batch.prompts[0]
        label = crop_to_box(sample.label, batch.boxes[0])
        for layer in (1, 2):
            for head in range(heads):
                maps = batch.recorder.i2t[layer][0, head].numpy()
                class_maps = class_score_maps(maps, np.array(prompt.spans), adapter.token_grid)
                prediction = predict_labels(prompt.class_ids, class_maps, len(dataset.class_names), label.shape)
                expected[layer, head].update(prediction, label)
    for row in scores.itertuples():
        assert row.mIoU == pytest.approx(expected[row.layer, row.head].compute()["mIoU"])
    assert scores["mIoU"].nunique() > 1  # heads differ


def test_official_geometry_crops_the_top_left_of_larger_images():
    # Two proposals: the left half of the token grid, and the right half.
    proposals = np.zeros((2, 4, 4))
    proposals[0, :, :2] = 1
    proposals[1, :, 2:] = 1
    # An image no larger than its resized size: the same halves as a plain resize.
    small = official_cluster_labels(proposals, (4, 8), (8, 16))
    np.testing.assert_array_equal(small, cluster_labels(proposals, (8, 16)))
    # Cityscapes-like: the original (16 x 32) is larger than the resized (8 x 16), so the official route keeps
    # the top-left 8 x 16 of the full-size prediction: only the left proposal.
    large = official_cluster_labels(proposals, (16, 32), (8, 16))
    assert (large == 0).all()
    assert set(np.unique(cluster_labels(proposals, (8, 16)))) == {0, 1}


def test_padding_fills_bottom_and_right_with_zeros():
    image = np.full((40, 50, 3), 255, dtype=np.uint8)
    pixels, box = prepare_image(image, 64, pad_multiple=32)  # padded to 64 x 64, then the stretch is the identity
    assert box == (0, 0, 40, 50)
    assert torch.allclose(pixels[:, :40, :50], torch.ones(3, 40, 50))
    assert pixels[:, 40:].abs().max() == 0 and pixels[:, :, 50:].abs().max() == 0


def test_overlay_clusters_take_the_colour_of_their_matched_class():
    label = np.array([[0, 0, 2, 2], [0, 0, 2, 2]])
    clusters = np.array([[1, 1, 0, 0], [1, 1, 0, 3]])
    shown = _clusters_as_classes(clusters, label, num_classes=3, ignore_index=255)
    assert shown[0, 0] == 0 and shown[0, 2] == 2  # cluster 1 → class 0, cluster 0 → class 2
    assert shown[1, 3] >= 3  # an unmatched cluster gets an id past the classes


def test_head_scores_record_the_fingerprint_of_the_model_they_loaded(world, tmp_path):
    """Fig. 4's job loads the model itself: every row names its source, revision and content fingerprint."""
    settings = ExtractionSettings.from_dict(dict(
        model="tiny", dataset="toy", backbone="sd3", source=str(world / "model"), dtype="float32", timestep=8,
        num_steps=28, layers=[1], seed=0, short_side=None, resize="stretch", prompt="oracle",
        background_name="background", split="val", background="last", limit=1,
    ))
    scores = score_heads(settings, world / "data", tmp_path / "shards")
    assert set(scores["model_fingerprint"]) == {model_fingerprint(world / "model")}
    assert set(scores["model_source"]) == {str(world / "model")} and scores["model_revision"].isna().all()
