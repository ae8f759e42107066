"""The repository is self-contained: no file points outside it, and every link to a section of
docs/method.md names a heading that exists."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHOD = REPO / "docs/method.md"

# Files that hold climbing paths on purpose.
DELIBERATE_ESCAPES = {
    "tests/datasets/test_extract.py": "archive members that try to leave the extraction folder",
    "tests/datasets/test_prepare.py": "archive members that try to leave the extraction folder",
    "tests/test_docs.py": "the examples its own checks are tested on",
}
# Paths of the machine the project was developed on, which a clone does not have.
FOREIGN_PATHS = re.compile(r"(?:\.\.|/work)/shared\b|\bshared[/](?:docs|paper)\b")
# A relative path that starts by climbing: ../x, ../../x (not a/../x, which stays below a).
CLIMBING_PATH = re.compile(r"(?<![\w./-])((?:\.\./)+[\w.-][\w./-]*)")
METHOD_LINK = re.compile(r"(?:docs/)?method\.md#([A-Za-z0-9_-]+)")
SAME_PAGE_LINK = re.compile(r"\]\(#([A-Za-z0-9_-]+)\)")
# Pipeline outputs and inputs at the top level (not tracked), skipped when git cannot list the files.
UNTRACKED_TOP_FOLDERS = {"results", "data", "logs", "build", "dist"}


def repository_files() -> list[Path]:
    """Tracked and not-ignored files (git), or a walk of the tree without outputs and hidden folders."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout.decode()
        return sorted({REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()})
    except (OSError, subprocess.CalledProcessError):
        files = []
        for root, folders, names in os.walk(REPO):
            top = Path(root) == REPO
            folders[:] = [
                f for f in folders
                if not f.startswith(".") and f != "__pycache__" and not (top and f in UNTRACKED_TOP_FOLDERS)
            ]
            files += [Path(root) / name for name in names]
        return sorted(files)


def text_of(path: Path) -> str | None:
    """The file as UTF-8 text, or None for binary files."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    texts = {}
    for path in repository_files():
        text = text_of(path)
        if text is not None:
            texts[path.relative_to(REPO).as_posix()] = text
    assert "README.md" in texts and "docs/method.md" in texts
    return texts


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    """Anchors of every heading outside code fences (a repeated heading gets -1, -2, … as on GitHub)."""
    anchors: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match and not fenced:
            anchor = base = github_anchor(match.group(1))
            count = 0
            while anchor in anchors:
                count += 1
                anchor = f"{base}-{count}"
            anchors.add(anchor)
    return anchors


def test_github_anchor_of_hand_worked_headings():
    assert github_anchor("Where the paper and the official code disagree") == (
        "where-the-paper-and-the-official-code-disagree"
    )
    assert github_anchor("PCA of q, k and v") == "pca-of-q-k-and-v"
    assert github_anchor("A.B (c): Perturbed-I2T guidance") == "ab-c-perturbed-i2t-guidance"
    assert heading_anchors("# X\n## X\n```\n# not a heading\n```\n### Y Z\n") == {"x", "x-1", "y-z"}


def test_no_file_refers_to_a_path_outside_the_repository(texts):
    problems = []
    for name, text in texts.items():
        for match in FOREIGN_PATHS.finditer(text):
            problems.append(f"{name}: {match.group(0)!r}")
        if name in DELIBERATE_ESCAPES:
            continue
        folder = (REPO / name).parent
        for match in CLIMBING_PATH.finditer(text):
            target = Path(os.path.normpath(folder / match.group(1)))
            if not target.is_relative_to(REPO):
                problems.append(f"{name}: {match.group(1)!r} leaves the repository")
    assert not problems, "files that point outside the repository:\n" + "\n".join(problems)


def test_no_file_cites_the_outside_method_document_by_name(texts):
    """The method document a clone has is docs/method.md; citations of the development machine's own method
    document (by its file name) cannot be resolved by a reader, so they point to docs/method.md instead."""
    name = "method" + "_spec"  # built at run time, so that this file does not hold the word it looks for
    citing = sorted(path for path, text in texts.items() if name in text.lower())
    assert not citing, f"files that cite {name} (a document outside the repository; cite docs/method.md):\n" + (
        "\n".join(citing))


def test_the_outside_path_checks_catch_the_forms_they_target():
    # Built at run time, so that neither this file nor its bytecode holds the paths it looks for.
    folder = "shared"
    assert FOREIGN_PATHS.search(f"see `../{folder}/docs/spec.md`")
    assert FOREIGN_PATHS.search(f'Path("/work/{folder}/paper/x.txt")')
    escaping = CLIMBING_PATH.search("(../../outside/file.md)").group(1)
    assert not Path(os.path.normpath(REPO / "docs" / escaping)).is_relative_to(REPO)
    assert CLIMBING_PATH.search("members/../../x") is None  # a member name, not a reference


def test_method_document_has_the_sections_the_code_cites():
    anchors = heading_anchors(METHOD.read_text(encoding="utf-8"))
    for section in (
        "image-preprocessing", "noising-and-timesteps", "prompts-and-token-spans",
        "attention-maps-and-normalisation", "label-prediction", "metrics", "unsupervised-protocol", "value-norms",
        "perturbation-and-fidelity", "flux-specifics", "magnet", "where-the-paper-and-the-official-code-disagree",
    ):
        assert section in anchors, section


def test_every_link_to_a_method_section_resolves(texts):
    anchors = heading_anchors(texts["docs/method.md"])
    links = {(name, anchor) for name, text in texts.items() for anchor in METHOD_LINK.findall(text)}
    links |= {("docs/method.md", anchor) for anchor in SAME_PAGE_LINK.findall(texts["docs/method.md"])}
    # The README, the code, the captions and the tests link into it; far fewer would mean a broken pattern.
    assert len({name for name, _ in links}) >= 20, sorted(links)
    broken = sorted(f"{name}: #{anchor}" for name, anchor in links if anchor not in anchors)
    assert not broken, "links to headings docs/method.md does not have:\n" + "\n".join(broken)
