"""The offline Hugging Face CLIP tokenizers must reproduce open_clip's reference CLIP tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import ftfy
import pytest
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from seg4diff_repro.models.clip_tokenizer import build_sd3_tokenizers, write_clip_tokenizer_files

# DrawBench prompts from the paper's appendix (Fig. 1), with punctuation, digits and deliberate typos.
DRAWBENCH = [
    "A horse riding an astronaut.",
    "Three cats and two dogs sitting on the grass.",
    "A triangular pink stop sign. A pink stop sign in the shape of a triangle.",
    "A stack of 3 cubes. A red cube is on the top, sitting on a red cube. The red cube is in the middle, "
    "sitting on a green cube. The green cube is on the bottom.",
    "A large plant-eating domesticated mammal with solid hoofs and a flowing mane and tail, used for riding, "
    "racing, and to carry and pull loads.",
    "Rbefraigerator.",
    "Dininrg tablez.",
    "Acersecomicke.",
    "A real life photography of super mario, 8k Ultra HD.",
    "A magnifying glass over a page of a 1950s batman comic.",
    "A sign that says 'Hello World'.",
    'A sign that says "Diffusion".',
    "Photo of a mega Lego space station inside a kid's bedroom.",
]
CLASS_NAMES = ["diningtable", "pottedplant", "tvmonitor", "wall-brick", "circle", "square", "triangle", "star"]
TEXTS = [*DRAWBENCH, *CLASS_NAMES, ""]
# DrawBench #31: far longer than CLIP's 77-token context.
LONG_PROMPT = (
    "An instqrumemnt used for cutting cloth, paper, axdz othr thdin mteroial, consamistng of two blades lad one on "
    "tvopb of the other and fhastned in tle mixdqdjle so as to bllow them txo be pened and closed by thumb and "
    "fitngesr inserted tgrough rings on kthe end oc thei vatndlzes."
)
EOS = 49407


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    return build_sd3_tokenizers(tmp_path_factory.mktemp("clip_bpe"))


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer()


def _open_clip_ids(reference: SimpleTokenizer, texts: list[str]) -> list[list[int]]:
    """open_clip's ids up to and including <eos> (it pads with 0, Hugging Face does not)."""
    rows = reference(texts, context_length=77).tolist()
    return [row[: row.index(EOS) + 1] for row in rows]


@pytest.mark.parametrize(("which", "pad_id"), [(0, EOS), (1, 0)], ids=["tokenizer", "tokenizer_2"])
def test_ids_match_open_clip(tokenizers, reference, which: int, pad_id: int) -> None:
    tokenizer = tokenizers[which]
    ids = tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True).input_ids
    expected = _open_clip_ids(reference, TEXTS)
    for text, row, want in zip(TEXTS, ids, expected):
        assert len(row) == 77, text
        assert row[: len(want)] == want, text
        assert row[len(want) :] == [pad_id] * (77 - len(want)), text
    assert tokenizer.pad_token_id == pad_id
    assert tokenizer.model_max_length == 77


@pytest.mark.parametrize("which", [0, 1], ids=["tokenizer", "tokenizer_2"])
def test_long_prompt_truncated_like_open_clip(tokenizers, reference, which: int) -> None:
    ids = tokenizers[which](LONG_PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(tokenizers[which](LONG_PROMPT).input_ids) > 77
    assert ids == reference([LONG_PROMPT], context_length=77)[0].tolist()
    assert ids[-1] == EOS


def test_vocab_and_merges_files_match_open_clip(tmp_path: Path, reference: SimpleTokenizer) -> None:
    write_clip_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    # Hugging Face names open_clip's <start_of_text>/<end_of_text> as in the OpenAI release.
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    expected = {renamed.get(token, token): i for token, i in reference.encoder.items()}
    assert len(vocab) == 49408
    assert list(vocab.items()) == list(expected.items())  # same ids and same order
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407

    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert [tuple(line.split(" ")) for line in lines[1:]] == sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
    assert len(lines) - 1 == 48894


def test_vocab_size(tokenizers) -> None:
    assert [len(t) for t in tokenizers] == [49408, 49408]


def test_typographic_quotes_differ_only_by_ftfy(tokenizers, reference) -> None:
    # Stock Hugging Face CLIP does not run ftfy; open_clip straightens ’ to ' before tokenizing.
    text = "Photo of an athlete cat explaining it’s latest scandal at a press conference to journalists."
    ids = tokenizers[0](ftfy.fix_text(text)).input_ids
    assert ids == _open_clip_ids(reference, [text])[0]
    assert tokenizers[0](text).input_ids != ids


def test_exclamation_mark_is_the_clip_g_pad_token(tokenizers, reference) -> None:
    # SD3/SDXL's tokenizer_2 registers "!" as a special pad token, so it never becomes "!</w>" (id 256).
    text = "Hello World! wow!"
    want = _open_clip_ids(reference, [text])[0]
    assert 256 in want
    assert tokenizers[0](text).input_ids == want
    assert tokenizers[1](text).input_ids == [0 if i == 256 else i for i in want]


def test_tokenizer_folder_must_be_a_folder(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "clip_bpe"
    not_a_folder.write_text("x")
    with pytest.raises(NotADirectoryError, match="clip_bpe"):
        write_clip_tokenizer_files(not_a_folder)
