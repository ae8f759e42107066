"""Open-vocabulary prompts and class token spans (docs/method.md#prompts-and-token-spans).

References: plain-Python restatements of the official rules (seg4diff_model_ovss.py:93-99, 149-168, 319-339)
and the real offline CLIP-L tokenizer, tokenizing the whole prompt exactly as the SD3 pipeline does.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from seg4diff_repro.models.clip_tokenizer import CLIP_BOS_ID, CLIP_EOS_ID, build_sd3_tokenizers
from seg4diff_repro.segmentation.prompts import (
    build_class_prompt,
    overflowing_classes,
    prompt_class_ids,
    prompt_label,
    prompt_word,
    window_spans,
)

VOC21 = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()
# ADE20K-150 names (with the stray trailing space of "bed " and multi-word names), as in ade150.json.
ADE150 = (
    "wall|building|sky|floor|tree|ceiling|road|bed |windowpane|grass|cabinet|sidewalk|person|earth|door|table|"
    "mountain|plant|curtain|chair|car|water|painting|sofa|shelf|house|sea|mirror|rug|field|armchair|seat|fence|"
    "desk|rock|wardrobe|lamp|bathtub|railing|cushion|base|box|column|signboard|chest of drawers|counter|sand|"
    "sink|skyscraper|fireplace|refrigerator|grandstand|path|stairs|runway|case|pool table|pillow|screen door|"
    "stairway|river|bridge|bookcase|blind|coffee table|toilet|flower|book|hill|bench|countertop|stove|palm|"
    "kitchen island|computer|swivel chair|boat|bar|arcade machine|hovel|bus|towel|light|truck|tower|chandelier|"
    "awning|streetlight|booth|television receiver|airplane|dirt track|apparel|pole|land|bannister|escalator|"
    "ottoman|bottle|buffet|poster|stage|van|ship|fountain|conveyer belt|canopy|washer|plaything|swimming pool|"
    "stool|barrel|basket|waterfall|tent|bag|minibike|cradle|oven|ball|food|step|tank|trade name|microwave|pot|"
    "animal|bicycle|lake|dishwasher|screen|blanket|sculpture|hood|sconce|vase|traffic light|tray|ashcan|fan|"
    "pier|crt screen|plate|monitor|bulletin board|shower|radiator|glass|clock|flag"
).split("|")
COCO_STUFF_LIKE = ["person", "wall-brick", "floor-wood", "sky-other", "tree", "grass", "wall-other-merged"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_sd3_tokenizers(tmp_path_factory.mktemp("clip_tokenizer"))[0]


def official_word(name: str, background_name: str = "background") -> str:
    """Official: 'background' → background_name.replace('-', ' '); then name.split('-')[0]."""
    if name == "background":
        name = background_name.replace("-", " ")
    return name.split("-")[0]


def window_ids(tokenizer, text: str) -> list[int]:
    """The 77 CLIP-L ids the SD3 pipeline feeds the text encoder (pipeline_stable_diffusion_3._get_clip_prompt_embeds)."""
    return tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids


def word_ids(tokenizer, word: str) -> list[int]:
    return tokenizer(word, add_special_tokens=False).input_ids


# --- prompt_class_ids -------------------------------------------------------------------------------------


def test_oracle_ids_are_gt_classes_ascending_without_ignore():
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([17, 3, 255, 9, 0, 3], dtype=np.uint8), size=(31, 47))
    expected = sorted({int(v) for v in np.unique(label)} - {255})  # bincount(GT)[:C] > 0 drops 255
    assert expected == [0, 3, 9, 17]
    assert prompt_class_ids(label, 21, "oracle") == expected
    assert prompt_class_ids(np.full((4, 5), 255, np.uint8), 21, "oracle") == []


def test_vocabulary_protocol_and_unknown_protocol():
    label = np.array([[1, 255]], dtype=np.uint8)
    assert prompt_class_ids(label, 5, "vocabulary") == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="oracle"):
        prompt_class_ids(label, 5, "gt")


# --- prompt_word ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "background_name"),
    [("wall-brick", "background"), ("wall-other-merged", "background"), ("traffic light", "background"),
     ("background", "background"), ("background", "sky-ground"), ("background", "stuff"), ("tvmonitor", "x")],
)
def test_prompt_word_matches_official_rule(name, background_name):
    assert prompt_word(name, background_name) == official_word(name, background_name).strip()


def test_prompt_word_examples():
    assert prompt_word("wall-brick") == "wall"
    assert prompt_word("background", "sky-ground") == "sky ground"  # hyphen → space, not cut
    assert prompt_word("background", "stuff") == "stuff"
    assert prompt_word("bed ") == "bed"


# --- build_class_prompt -----------------------------------------------------------------------------------


def check_spans(tokenizer, prompt, names, class_ids, background_name="background"):
    """Spans start at 1, are consecutive, and index exactly each word's tokens inside the 77-token window."""
    words = [official_word(names[c], background_name) for c in class_ids]
    assert prompt.text.split() == " ".join(words).split()  # same words, single spaces
    assert prompt.text == " ".join(w.strip() for w in words)
    assert prompt.class_ids == tuple(class_ids)
    assert len(prompt.spans) == len(class_ids)
    ids = window_ids(tokenizer, prompt.text)
    assert len(ids) == 77 and ids[0] == CLIP_BOS_ID
    # The untruncated tokenization is <sos> + the concatenated word tokens + <eos>.
    full = tokenizer(prompt.text).input_ids
    concatenated = [t for w in words for t in word_ids(tokenizer, w)]
    assert full == [CLIP_BOS_ID, *concatenated, CLIP_EOS_ID]
    position = 1
    for word, (start, end) in zip(words, prompt.spans):
        expected = word_ids(tokenizer, word)
        assert (start, end) == (position, position + len(expected))  # untruncated
        if end <= 76:  # wholly inside the window, before <eos>
            assert ids[start:end] == expected
        position += len(expected)
    return ids


def test_voc_prompt_multi_token_names(tokenizer):
    class_ids = [0, 11, 15, 16, 20]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompt = build_class_prompt(class_ids, VOC21, tokenizer)
    assert prompt.text == "background diningtable person pottedplant tvmonitor"
    ids = check_spans(tokenizer, prompt, VOC21, class_ids)
    lengths = [end - start for start, end in prompt.spans]
    assert lengths == [len(word_ids(tokenizer, w)) for w in prompt.text.split()]
    assert max(lengths) > 1  # the multi-token case is exercised
    assert prompt.spans[0][0] == 1
    assert all(a[1] == b[0] for a, b in zip(prompt.spans, prompt.spans[1:]))
    last = prompt.spans[-1][1]
    assert ids[last] == CLIP_EOS_ID and set(ids[last:]) == {CLIP_EOS_ID}  # then <eos> and <eos> padding


def test_background_name_replaced(tokenizer):
    prompt = build_class_prompt([0, 7], VOC21, tokenizer, background_name="sky-ground")
    assert prompt.text == "sky ground car"
    check_spans(tokenizer, prompt, VOC21, [0, 7], background_name="sky-ground")
    assert prompt.spans == ((1, 3), (3, 4))


def test_hyphenated_names_cut(tokenizer):
    class_ids = list(range(len(COCO_STUFF_LIKE)))
    prompt = build_class_prompt(class_ids, COCO_STUFF_LIKE, tokenizer)
    assert prompt.text == "person wall floor sky tree grass wall"
    check_spans(tokenizer, prompt, COCO_STUFF_LIKE, class_ids)


def test_empty_prompt(tokenizer):
    prompt = build_class_prompt([], VOC21, tokenizer)
    assert prompt.text == "" and prompt.spans == () and prompt.class_ids == ()
    assert window_ids(tokenizer, prompt.text)[:2] == [CLIP_BOS_ID, CLIP_EOS_ID]


def test_long_vocabulary_warns_and_window_spans_follow_each_rule(tokenizer):
    class_ids = list(range(len(ADE150)))
    with pytest.warns(UserWarning, match="77-token") as caught:
        prompt = build_class_prompt(class_ids, ADE150, tokenizer)
    ids = check_spans(tokenizer, prompt, ADE150, class_ids)
    assert ids[76] == CLIP_EOS_ID  # truncation puts <eos> in the last column
    # Independent count of where each class starts and ends in the untruncated sequence.
    lengths = [len(word_ids(tokenizer, official_word(n))) for n in ADE150]
    starts = np.cumsum([1] + lengths)[:-1]
    ends = starts + lengths
    # Official slice [st, st + n) of the 77 columns (seg4diff_model_ovss.py:219-221), as Python slicing does.
    official = [(min(s, 77), min(e, 77)) for s, e in zip(starts, ends)]
    assert window_spans(prompt.spans, 77, "official") == official
    straddling = [c for c in class_ids if starts[c] <= 76 < ends[c]]
    assert len(straddling) == 1 and official[straddling[0]][1] == 77  # it averages the <eos> column 76
    corrected = window_spans(prompt.spans, 77, "corrected")
    assert max(e for _, e in corrected) == 76  # never the <eos> column
    assert [c for c, (s, e) in enumerate(corrected) if e <= s] == [c for c in class_ids if starts[c] >= 76]
    assert overflowing_classes(prompt.spans, 77) == sum(e > 76 for e in ends) > 50
    message = str(caught[0].message)
    assert ADE150[straddling[0]].strip() in message and ADE150[-1].strip() in message


def test_no_warning_when_it_fits(tokenizer):
    class_ids = list(range(20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompt = build_class_prompt(class_ids, ADE150, tokenizer)
    check_spans(tokenizer, prompt, ADE150, class_ids)
    assert all(e > s for s, e in prompt.spans)


def test_no_overflow_both_rules_agree(tokenizer):
    prompt = build_class_prompt(list(range(20)), ADE150, tokenizer)
    assert window_spans(prompt.spans, 77, "official") == window_spans(prompt.spans, 77, "corrected") == list(prompt.spans)
    assert overflowing_classes(prompt.spans, 77) == 0
    with pytest.raises(ValueError, match="official"):
        window_spans(prompt.spans, 77, "truncate")


# --- prompt_label: the class set of the test mapper's resized label ---------------------------------------


def test_prompt_classes_come_from_the_nearest_resized_label():
    """A 1-pixel class of a 1280x960 label vanishes in detectron2's 640-short-side nearest resize (official)."""
    from PIL import Image

    label = np.zeros((960, 1280), dtype=np.int64)
    label[0:480, :] = 3
    label[961 // 2 + 1, 5] = 7  # a single pixel off PIL's nearest sampling grid (every other row/column)
    resized = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((853, 640), Image.NEAREST))
    assert 7 not in resized  # the reference: PIL nearest at detectron2's output size (int(853.33 + 0.5) = 853)
    assert prompt_class_ids(prompt_label(label, 640, "resized"), 21, "oracle") == [0, 3]
    assert prompt_class_ids(prompt_label(label, 640, "original"), 21, "oracle") == [0, 3, 7]
    assert prompt_label(label, None, "resized") is label  # no resize configured (toy world)
    with pytest.raises(ValueError, match="resized"):
        prompt_label(label, 640, "mapper")


def test_resized_shape_rounds_halves_up_as_detectron2():
    """ResizeShortestEdge.get_output_shape: int(x + 0.5); 6 * 3/4 = 4.5 -> 5 (Python's round() would give 4)."""
    from seg4diff_repro.models.preprocess import resized_shape

    assert resized_shape(4, 6, 3) == (3, 5)
    assert resized_shape(375, 500, 640) == (640, int(500 * 640 / 375 + 0.5)) == (640, 853)
    assert resized_shape(1024, 2048, 640) == (640, 1280)
