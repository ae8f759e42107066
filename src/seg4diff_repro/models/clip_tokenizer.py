"""Offline Hugging Face CLIP tokenizers built from the BPE merges shipped with open_clip.

SD3 uses two CLIP tokenizers (CLIP-L and CLIP-G) over the same OpenAI CLIP BPE vocabulary.
Without hub access we rebuild the Hugging Face ``vocab.json`` / ``merges.txt`` pair from
``open_clip/bpe_simple_vocab_16e6.txt.gz``, in the same order as ``openai/clip-vit-large-patch14``.

Known differences from open_clip's own ``SimpleTokenizer`` (both are stock Hugging Face behaviour,
so the real SD3 pipeline has them too):

* the Hugging Face tokenizer does not run ``ftfy.fix_text``, so typographic quotes such as ``’``
  are kept instead of being straightened to ``'``;
* ``tokenizer_2`` registers ``!`` as its special pad token, so a ``!`` inside a prompt becomes id 0
  instead of ``!</w>`` (id 256).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

from seg4diff_repro.atomic import atomic_write_text

__all__ = [
    "CLIP_BOS_ID",
    "CLIP_EOS_ID",
    "CLIP_G_PAD_ID",
    "CLIP_MAX_LENGTH",
    "CLIP_VOCAB_SIZE",
    "build_sd3_tokenizers",
    "write_clip_tokenizer_files",
]

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_G_PAD_ID = 0  # id of "!", the pad token of SD3/SDXL's CLIP-G tokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_G_PAD_TOKEN = "!"

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI CLIP keeps the first 49152 - 256 - 2 merges so that bytes (256), bytes + "</w>" (256),
# merges and the two special tokens add up to 49408 ids.
_NUM_MERGES = 49152 - 256 - 2
_MERGES_HEADER = "#version: 0.2"


def _bpe_path() -> Path:
    """Locate open_clip's BPE merges file without importing open_clip (which pulls in torch/timm)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _BPE_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Cannot find open_clip's {_BPE_FILE} (looked in {locations or 'no open_clip package'}). "
        "The CLIP tokenizers are built offline from it: run `pip install open_clip_torch`."
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map, in the order CLIP numbers its ids."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """Read the merges CLIP uses from the gzipped BPE file (its first line is a header)."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    selected = lines[1 : _NUM_MERGES + 1]
    merges = []
    for lineno, line in enumerate(selected, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"{bpe_path}: line {lineno} is {line!r}, expected two BPE symbols; "
                "the file is corrupt, reinstall open_clip_torch."
            )
        merges.append((parts[0], parts[1]))
    if len(merges) != _NUM_MERGES:
        raise ValueError(
            f"{bpe_path}: found {len(merges)} merges, expected {_NUM_MERGES}; reinstall open_clip_torch."
        )
    return merges


def write_clip_tokenizer_files(out_dir: Path) -> None:
    """Write Hugging Face CLIP ``vocab.json`` and ``merges.txt`` into ``out_dir`` from open_clip's BPE file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder; remove it or pick another tokenizer folder.")
    merges = _read_merges(_bpe_path())
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(
            f"built a CLIP vocabulary of {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}; reinstall open_clip_torch."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out_dir / "merges.txt", "\n".join([_MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n")


def build_sd3_tokenizers(out_root: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Return SD3's (tokenizer, tokenizer_2): CLIP-L padding with <|endoftext|>, CLIP-G padding with "!".

    The BPE files are (re)written into ``out_root`` and both tokenizers are loaded from there.
    """
    out_root = Path(out_root)
    write_clip_tokenizer_files(out_root)
    tokenizer = CLIPTokenizer.from_pretrained(out_root, model_max_length=CLIP_MAX_LENGTH, pad_token=EOS_TOKEN)
    tokenizer_2 = CLIPTokenizer.from_pretrained(out_root, model_max_length=CLIP_MAX_LENGTH, pad_token=CLIP_G_PAD_TOKEN)
    for name, tok, pad_id in (("tokenizer", tokenizer, CLIP_EOS_ID), ("tokenizer_2", tokenizer_2, CLIP_G_PAD_ID)):
        # Guards against a transformers change silently renumbering tokens, which would desync the text encoders.
        ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok))
        if ids != (CLIP_BOS_ID, CLIP_EOS_ID, pad_id, CLIP_VOCAB_SIZE):
            raise RuntimeError(
                f"{name} loaded from {out_root} has (bos, eos, pad, size) = {ids}, expected "
                f"{(CLIP_BOS_ID, CLIP_EOS_ID, pad_id, CLIP_VOCAB_SIZE)}; check the transformers version."
            )
    return tokenizer, tokenizer_2
