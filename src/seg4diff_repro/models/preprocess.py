"""Image geometry of the Seg4Diff evaluation: shorter side to 640, then a stretch (or crop) to the model size."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ResizeMode = Literal["stretch", "center_crop"]


def center_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the largest centred square."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return top, left, top + side, left + side


def crop_to_box(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, bottom, right = box
    return array[top:bottom, left:right]


def resized_shape(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(height, width) after detectron2's test mapper scales the shorter side to ``short_side``."""
    if short_side is None:
        return height, width
    # ResizeShortestEdge.get_output_shape: int(x + 0.5), which rounds halves up (round() would go to even).
    factor = short_side / min(height, width)
    return int(height * factor + 0.5), int(width * factor + 0.5)


def prepare_image(
    image: np.ndarray, size: int, short_side: int | None = None, resize: ResizeMode = "stretch",
    pad_multiple: int | None = None,
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """An HxWx3 uint8 image → ([3, size, size] float in [0, 1], the region of the original it shows).

    ``short_side`` reproduces detectron2's test mapper (PIL bilinear); ``stretch`` is the official
    code's non-aspect-preserving resize, ``center_crop`` the paper's text. The returned box, in
    original pixel coordinates, tells the scorer which part of the label map the prediction covers.
    ``pad_multiple`` zero-pads the bottom and right to a multiple of it before the stretch, as the
    official unsupervised model does (docs/method.md#unsupervised-protocol); the box then still names the
    unpadded image.
    """
    height, width = image.shape[:2]
    box = (0, 0, height, width)
    if resize == "center_crop":
        box = center_crop_box(height, width)
        image = crop_to_box(image, box)
    elif resize != "stretch":
        raise ValueError(f"resize={resize!r}: use 'stretch' (official code) or 'center_crop' (paper text)")
    if short_side is not None:
        new_height, new_width = resized_shape(*image.shape[:2], short_side)
        image = np.array(Image.fromarray(image).resize((new_width, new_height), Image.BILINEAR))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)  # a copy: dataset arrays are read-only
    if pad_multiple is not None:
        h, w = pixels.shape[1:]
        pixels = F.pad(pixels, (0, -w % pad_multiple, 0, -h % pad_multiple))
    pixels = F.interpolate(pixels[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return pixels, box
