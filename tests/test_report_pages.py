"""The report's table pages: a table writer's Markdown rendered as HTML, everything in it kept."""

from __future__ import annotations

from html.parser import HTMLParser

from seg4diff_repro.tables.html import markdown_to_html_page, run_info_page

MARKDOWN = """# Per-layer scores: toy_sd3 on <toy_shapes>

model = toy_sd3, seed = 0, code 1a2b, commit e7fe2cb (dirty).
Scores in percent; `paper_mIoU` is **empty** where the paper reports no number.

| model   |   layer |   mIoU | paper_mIoU   |
|:--------|--------:|-------:|:-------------|
| toy_sd3 |       0 |  99.35 |              |
| toy_sd3 |       1 |  26.98 | 41.2         |
"""


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.cells: list[list[str]] = []
        self.text: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.cells.append([])
        self._in_cell = tag in ("td", "th")
        if self._in_cell:
            self.cells[-1].append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_cell:
            self.cells[-1][-1] += data


def test_a_table_page_keeps_title_provenance_notes_and_every_cell():
    page = markdown_to_html_page(MARKDOWN, title="per_layer_toy_sd3")
    parsed = _Collect()
    parsed.feed(page)
    text = "".join(parsed.text)
    assert "Per-layer scores: toy_sd3 on <toy_shapes>" in text  # escaped in the HTML, intact as text
    assert "<toy_shapes>" not in page
    assert "model = toy_sd3, seed = 0, code 1a2b, commit e7fe2cb (dirty). Scores in percent;" in text
    assert parsed.cells == [
        ["model", "layer", "mIoU", "paper_mIoU"],
        ["toy_sd3", "0", "99.35", ""],
        ["toy_sd3", "1", "26.98", "41.2"],
    ]
    aligns = [attrs["style"] for tag, attrs in parsed.tags if tag == "th"]
    assert aligns == ["text-align:left", "text-align:right", "text-align:right", "text-align:left"]
    assert "<code>paper_mIoU</code>" in page and "<strong>empty</strong>" in page
    assert [tag for tag, _ in parsed.tags].count("h1") == 1


def test_the_run_page_names_the_commit_dirty_flag_and_config():
    page = run_info_page({"run": {"models": ["toy_sd3"]}},
                         {"commit": "c" * 40, "dirty": True, "package_version": "0.1.0", "code_fingerprint": "abcd"})
    assert "c" * 40 in page and "dirty" in page and "abcd" in page and "- toy_sd3" in page
    clean = run_info_page({}, {"commit": "c" * 40, "dirty": False, "package_version": "0.1.0", "code_fingerprint": "abcd"})
    assert "dirty" not in clean
    assert "not a git checkout" in run_info_page({}, {"commit": None, "dirty": None, "package_version": "0.1.0",
                                                      "code_fingerprint": "abcd"})
