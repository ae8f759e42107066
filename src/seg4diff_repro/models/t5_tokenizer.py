"""An offline T5 tokenizer: a real ``transformers`` ``T5Tokenizer`` over a small Unigram vocabulary.

Flux's ``tokenizer_2`` is the T5 SentencePiece (Unigram) tokenizer. Without hub access we train a
small Unigram model with the ``tokenizers`` library on a built-in corpus (the class names of every
package class list, the 50 DrawBench prompts of the appendix's Fig. 1 and toy-shapes captions) and
wrap it in ``T5Tokenizer`` with T5's layout: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then the
trained pieces, then ``<extra_id_99>`` … ``<extra_id_0>`` (so ``<extra_id_0>`` is the last id, as in T5).
Pre-tokenisation and decoding are T5's (whitespace split, ``▁`` word prefix); a word is always cut
into pieces on its own, so a prompt's tokens are the concatenation of its words' tokens plus ``</s>``.

Differences from the real T5 tokenizer: a vocabulary of a few hundred pieces instead of 32 000, no
NFKC normalisation (T5's precompiled SentencePiece charsmap needs ``sentencepiece``), and characters
outside printable ASCII and the corpus map to ``<unk>``.

Determinism: the ``tokenizers`` Unigram trainer sums floats in a run-dependent order, so its scores
vary in the last bits between processes; scores are rounded to 1e-6 and pieces sorted by
(score, piece), which makes the vocabulary the same in every run.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import T5Tokenizer

__all__ = [
    "DRAWBENCH_PROMPTS",
    "T5_EOS_ID",
    "T5_EXTRA_IDS",
    "T5_MAX_LENGTH",
    "T5_PAD_ID",
    "T5_UNK_ID",
    "build_t5_tokenizer",
    "t5_corpus",
    "train_t5_vocab",
]

T5_PAD_ID = 0
T5_EOS_ID = 1
T5_UNK_ID = 2
T5_EXTRA_IDS = 100
T5_MAX_LENGTH = 512  # model_max_length of T5-XXL's tokenizer (Flux's tokenizer_2)
_SPECIALS = ("<pad>", "</s>", "<unk>")
_VOCAB_SIZE = 2000  # an upper bound: the trainer stops earlier on this small corpus
_SCORE_DECIMALS = 6
_LADDER_STEP = 1e-4  # the trainer's score step between its fallback characters

# The 50 DrawBench prompts of the appendix (Fig. 1), verbatim (line breaks of the PDF removed).
DRAWBENCH_PROMPTS: tuple[str, ...] = (
    "A red colored car.",
    "A black colored dog.",
    "A blue colored dog.",
    "A red colored banana.",
    "A white colored sandwich.",
    "A yellow colored giraffe.",
    "A green cup and a blue cell phone.",
    "A horse riding an astronaut.",
    "A shark in the desert.",
    "Three cars on the street.",
    "One dog on the street.",
    "Two dogs on the street.",
    "One cat and one dog sitting on the grass.",
    "Three cats and one dog sitting on the grass.",
    "Three cats and two dogs sitting on the grass.",
    "A triangular pink stop sign. A pink stop sign in the shape of a triangle.",
    "An illustration of a small green elephant standing behind a large red mouse.",
    "A small blue book sitting on a large red book.",
    "A stack of 3 cubes. A red cube is on the top, sitting on a red cube. The red cube is in the middle, "
    "sitting on a green cube. The green cube is on the bottom.",
    "A stack of 3 books. A green book is on the top, sitting on a red book. The red book is in the middle, "
    "sitting on a blue book. The blue book is on the bottom.",
    "A small vessel propelled on water by oars, sails, or an engine.",
    "A large plant-eating domesticated mammal with solid hoofs and a flowing mane and tail, used for riding, "
    "racing, and to carry and pull loads.",
    "An American multinational technology company that focuses on artificial intelligence, search engine, "
    "online advertising, cloud computing, computer software, quantum computing, e-commerce, and consumer "
    "electronics.",
    "A large thick-skinned semiaquatic African mammal, with massive jaws and large tusks.",
    "A machine resembling a human being and able to replicate certain human movements and functions "
    "automatically.",
    "A grocery store refrigerator has pint cartons of milk on the top shelf, quart cartons on the middle "
    "shelf, and gallon plastic jugs on the bottom shelf.",
    "An elephant is behind a tree. You can see the trunk on one side and the back legs on the other.",
    "A pear cut into seven pieces arranged in a ring.",
    "Rbefraigerator.",
    "Dininrg tablez.",
    "An instqrumemnt used for cutting cloth, paper, axdz othr thdin mteroial, consamistng of two blades lad "
    "one on tvopb of the other and fhastned in tle mixdqdjle so as to bllow them txo be pened and closed by "
    "thumb and fitngesr inserted tgrough rings on kthe end oc thei vatndlzes.",
    "A bicycle on top of a boat.",
    "A car on the left of a bus.",
    "Acersecomicke.",
    "Artophagous.",
    "Backlotter.",
    "A photo of a confused grizzly bear in calculus class.",
    "Photo of an athlete cat explaining it’s latest scandal at a press conference to journalists.",
    "Hyper-realistic photo of an abandoned industrial site during a storm.",
    "A real life photography of super mario, 8k Ultra HD.",
    "Colouring page of large cats climbing the eifel tower in a cyberpunk future.",
    "Photo of a mega Lego space station inside a kid’s bedroom.",
    "A spider with a moustache bidding an equally gentlemanly grasshopper a good day during his walk to work.",
    "A bridge connecting Europe and North America on the Atlantic Ocean, bird’s eye view.",
    "A magnifying glass over a page of a 1950s batman comic.",
    "A realistic photo of a Pomeranian dressed up like a 1980s professional wrestler with neon green and neon "
    "orange face paint and bright green wrestling tights with bright orange boots.",
    "A sign that says ’Hello World’.",
    "A sign that says ’Diffusion’.",
    "New York Skyline with ’NeurIPS’ written with fireworks on the sky.",
    "New York Skyline with ’Google Research Pizza Cafe’ written with fireworks on the sky.",
)

# Toy-shapes captions: each toy class is one shape in one colour ("a red circle and a blue square").
_TOY_OBJECTS = ("red circle", "blue square", "green triangle", "yellow star")
# Every printable ASCII character plus the typographic apostrophe of the DrawBench prompts is a piece.
_ALPHABET = [chr(code) for code in range(33, 127)] + ["’"]


def _class_names() -> list[str]:
    """The names of every class list shipped with the package (``data/classes/*.json``), sorted by file."""
    folder = resources.files("seg4diff_repro") / "data" / "classes"
    names: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        if entry.name.endswith(".json"):
            names.extend(json.loads(entry.read_text(encoding="utf-8"))["names"])
    return names


def _toy_captions() -> list[str]:
    captions = ["background", *(f"a {obj}" for obj in _TOY_OBJECTS)]
    captions += [f"a {a} and a {b}" for a in _TOY_OBJECTS for b in _TOY_OBJECTS if a != b]
    return captions


def t5_corpus() -> list[str]:
    """The training corpus: class names (also with their "-" cut, as in the eval prompts), DrawBench, toy captions."""
    names = _class_names()
    cut = [name.split("-")[0] for name in names]
    return [*names, *cut, *DRAWBENCH_PROMPTS, *_toy_captions()]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # T5Tokenizer's own pre-tokeniser: split on whitespace, prefix every word with "▁".
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )


def _canonical_required_chars(trained: list[list]) -> list[tuple[str, float]]:
    """Give the trainer's fallback characters their scores in code-point order.

    After pruning, the trainer appends every required character that is no longer a piece with the
    scores s, s − 1e-4, s − 2e-4, … in the iteration order of a hash set, which changes from run to
    run. That ladder ends at the lowest score of the vocabulary; it is found by stepping up from there
    in steps of 1e-4 through single characters.
    """
    pieces = [(piece, float(score)) for piece, score in trained]
    chars = {piece: score for piece, score in pieces if len(piece) == 1}
    if not chars:
        return pieces
    lowest = min(score for _, score in pieces)
    by_score = sorted(chars.items(), key=lambda item: item[1])
    ladder: list[tuple[str, float]] = []
    for piece, score in by_score:
        if abs(score - (lowest + len(ladder) * _LADDER_STEP)) < 1e-9:
            ladder.append((piece, score))
    if len(ladder) < 2:
        return pieces
    members = {piece for piece, _ in ladder}
    scores = sorted((score for _, score in ladder), reverse=True)
    reassigned = dict(zip(sorted(members), scores))
    return [(piece, reassigned.get(piece, score)) for piece, score in pieces]


def train_t5_vocab(corpus: list[str] | None = None) -> list[tuple[str, float]]:
    """Train a Unigram vocabulary on ``corpus`` (default: `t5_corpus`); return T5's (piece, log-prob) list.

    The list is ``<pad>``, ``</s>``, ``<unk>``, the trained pieces by descending score (ties by piece),
    then the 100 sentinels ``<extra_id_99>`` … ``<extra_id_0>`` with score 0.
    """
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.UnigramTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(_SPECIALS),
        unk_token="<unk>",
        initial_alphabet=_ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator(t5_corpus() if corpus is None else corpus, trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]["vocab"]
    if [piece for piece, _ in trained[: len(_SPECIALS)]] != list(_SPECIALS):
        raise RuntimeError(f"the Unigram trainer put {trained[:3]} first, expected {_SPECIALS}; check tokenizers")
    pieces = _canonical_required_chars(trained[len(_SPECIALS) :])
    pieces = sorted(
        ((piece, round(score, _SCORE_DECIMALS)) for piece, score in pieces),
        key=lambda item: (-item[1], item[0]),
    )
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in range(T5_EXTRA_IDS - 1, -1, -1)]
    return [(piece, 0.0) for piece in _SPECIALS] + pieces + sentinels


def build_t5_tokenizer(out_dir: Path | None = None) -> T5Tokenizer:
    """Return the offline T5 tokenizer; with ``out_dir`` it is saved there and loaded back from it."""
    tokenizer = T5Tokenizer(vocab=train_t5_vocab(), extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
        tokenizer = T5Tokenizer.from_pretrained(out_dir)
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    extra_0 = tokenizer.convert_tokens_to_ids("<extra_id_0>")
    # Guards against a transformers change renumbering tokens, which would desync the T5 embedding table.
    if ids != (T5_PAD_ID, T5_EOS_ID, T5_UNK_ID) or extra_0 != len(tokenizer) - 1:
        raise RuntimeError(
            f"the T5 tokenizer has (pad, eos, unk) = {ids} and <extra_id_0> = {extra_0} of {len(tokenizer)}, "
            f"expected {(T5_PAD_ID, T5_EOS_ID, T5_UNK_ID)} and the last id; check the transformers version."
        )
    return tokenizer
