"""Prompts for open-vocabulary segmentation and the text columns that belong to each class.

docs/method.md#prompts-and-token-spans: the prompt is the names of the classes (the GT classes of the image
under the paper's oracle protocol, or the whole vocabulary), ascending by class id, each cut at its
first "-", joined with single spaces, no template. Class c owns the n_c consecutive CLIP-L token
positions of its name, starting at position 1 (after <sos>).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

PromptProtocol = Literal["oracle", "vocabulary", "null"]


@dataclass(frozen=True)
class ClassPrompt:
    """A prompt and, per class in it, the half-open range of text positions of its tokens."""

    text: str
    class_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]


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
    """Join the class words and locate each class's tokens; classes cut off by truncation get empty spans.

    ``start`` is the position of the prompt's first token: 1 after CLIP's <sos> (SD3), 0 for T5 (Flux).
    """
    words = [prompt_word(class_names[c], background_name) for c in class_ids]
    spans, position = [], start
    for word in words:
        n_tokens = len(tokenizer(word, add_special_tokens=False).input_ids)
        spans.append((min(position, context - 1), min(position + n_tokens, context - 1)))
        position += n_tokens
    lost = [w for w, (first, end) in zip(words, spans) if end <= first]
    if lost:
        warnings.warn(
            f"prompt longer than the {context}-token CLIP window: classes {lost} were truncated away "
            "and cannot be predicted for this image",
            stacklevel=2,
        )
    return ClassPrompt(text=" ".join(words), class_ids=tuple(class_ids), spans=tuple(spans))
