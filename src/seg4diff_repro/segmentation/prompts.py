"""Prompts for open-vocabulary segmentation and the text columns that belong to each class.

docs/method.md#prompts-and-token-spans: the prompt is the names of the classes (the GT classes of the image
under the paper's oracle protocol, or the whole vocabulary), ascending by class id, each cut at its
first "-", joined with single spaces, no template. Class c owns the n_c consecutive CLIP-L token
positions of its name, starting at position 1 (after <sos>). The class set comes from the label the
official test mapper produced, i.e. after its 640-short-side nearest resize (``prompt_label``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

PromptProtocol = Literal["oracle", "vocabulary", "null"]
#: Where the oracle class set is read: the label after the test mapper's nearest resize to the short side
#: (official, ``get_gt_indices`` on the mapper's ``sem_seg``) or the original label.
PROMPT_CLASSES_FROM = ("resized", "original")
#: What happens to classes whose tokens reach past the text window (> 75 prompt tokens): ``official``: the
#: class reaching the last position averages it (the <eos> that truncation puts there) and classes past it
#: get empty slices, whose NaN maps win torch's argmax everywhere; ``corrected``: a class uses only its own
#: tokens inside the window, and a class with none is never predicted.
PROMPT_OVERFLOW = ("official", "corrected")


@dataclass(frozen=True)
class ClassPrompt:
    """A prompt and, per class in it, the half-open range of text positions of its tokens."""

    text: str
    class_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]  # untruncated: may reach past the window; see `window_spans`


def prompt_class_ids(label: np.ndarray, num_classes: int, protocol: PromptProtocol) -> list[int]:
    """Class ids in the prompt: those present in the label map (oracle), all of them (vocabulary), or none
    (null: the empty prompt of unsupervised segmentation, docs/method.md#unsupervised-protocol)."""
    if protocol == "vocabulary":
        return list(range(num_classes))
    if protocol == "null":
        return []
    if protocol != "oracle":
        raise ValueError(
            f"prompt protocol {protocol!r}: use 'oracle' (GT classes, the paper), 'vocabulary' or 'null'"
        )
    present = np.bincount(label[label < num_classes].ravel(), minlength=num_classes) > 0
    return np.flatnonzero(present).tolist()


def prompt_label(label: np.ndarray, short_side: int | None, prompt_classes_from: str) -> np.ndarray:
    """The label whose classes make the oracle prompt: ``resized`` to the test mapper's size with PIL's
    nearest neighbour (detectron2's ResizeShortestEdge on ``sem_seg``), where a small class can vanish,
    or the ``original`` label."""
    from PIL import Image

    from seg4diff_repro.models.preprocess import resized_shape

    if prompt_classes_from not in PROMPT_CLASSES_FROM:
        raise ValueError(f"prompt_classes_from={prompt_classes_from!r}: use one of {list(PROMPT_CLASSES_FROM)}")
    if prompt_classes_from == "original" or short_side is None:
        return label
    height, width = resized_shape(*label.shape, short_side)
    if (height, width) == label.shape:
        return label
    resized = Image.fromarray(np.asarray(label, dtype=np.uint8)).resize((width, height), Image.NEAREST)
    return np.asarray(resized).astype(label.dtype)


def window_spans(spans, context: int, overflow: str) -> list[tuple[int, int]]:
    """Each class's text positions inside the ``context``-token window, by the ``overflow`` rule.

    ``official`` (seg4diff_model_ovss.py:219-221): the slice ``[start, end)`` of the 77 columns, so the class
    reaching position ``context - 1`` (the <eos> of a truncated prompt) averages it and classes past the
    window get an empty slice. ``corrected``: positions before ``context - 1`` only.
    """
    if overflow not in PROMPT_OVERFLOW:
        raise ValueError(f"prompt overflow rule {overflow!r}: use one of {list(PROMPT_OVERFLOW)}")
    limit = context if overflow == "official" else context - 1
    return [(min(int(start), limit), min(int(end), limit)) for start, end in spans]


def overflowing_classes(spans, context: int) -> int:
    """How many classes reach the last window position or beyond: those the two overflow rules treat apart."""
    return sum(int(end) > context - 1 for _, end in spans)


def prompt_word(class_name: str, background_name: str = "background") -> str:
    """The word(s) a class contributes to the prompt: its name cut at the first '-'.

    "background" becomes ``background_name`` with its hyphens turned into spaces (official
    ``background_name.replace('-', ' ')``, seg4diff_model_ovss.py:93-99), so it is never cut.
    """
    word = background_name.replace("-", " ") if class_name == "background" else class_name
    return word.split("-")[0].strip()


def build_class_prompt(
    class_ids: list[int],
    class_names: list[str],
    tokenizer,
    background_name: str = "background",
    context: int = 77,
    start: int = 1,
) -> ClassPrompt:
    """Join the class words and locate each class's tokens (untruncated spans); warns when they overflow.

    ``start`` is the position of the prompt's first token: 1 after CLIP's <sos> (SD3), 0 for T5 (Flux).
    Which window columns a class then uses is `window_spans`'s rule.
    """
    words = [prompt_word(class_names[c], background_name) for c in class_ids]
    spans, position = [], start
    for word in words:
        n_tokens = len(tokenizer(word, add_special_tokens=False).input_ids)
        spans.append((position, position + n_tokens))
        position += n_tokens
    lost = [w for w, (_, end) in zip(words, spans) if end > context - 1]
    if lost:
        warnings.warn(
            f"prompt longer than the {context}-token text window: classes {lost} reach its last position or "
            "beyond (see segmentation.prompt_overflow for how they are scored)",
            stacklevel=2,
        )
    return ClassPrompt(text=" ".join(words), class_ids=tuple(class_ids), spans=tuple(spans))
