"""Pure units: chunk boundaries, token limits, offsets, headings and pages."""

from __future__ import annotations

import pytest

from tasks.chunking import Chunker, heading_outline
from tasks.errors import ConfigurationError
from tasks.parsing import ParsedDocument, parse_document

from .conftest import SAMPLES, synthetic_records


@pytest.fixture(scope="module")
def tokenizer():
    from tasks.embedders.local import load_tokenizer, resolve_model_dir
    from tasks.settings import DEFAULT_MODEL

    return load_tokenizer(resolve_model_dir(DEFAULT_MODEL))


def test_chunks_never_exceed_the_budget_and_offsets_are_exact(tokenizer):
    chunker = Chunker(tokenizer, 64, overlap=8)
    for row in synthetic_records(40, seed=2):
        doc = ParsedDocument(row["_id"], row["title"] + "\n\n" + row["text"], row["title"])
        spans = chunker.split(doc)
        assert spans
        for s in spans:
            assert len(tokenizer.encode(s.text, add_special_tokens=False).ids) <= 64
            assert doc.text[s.char_start : s.char_end] == s.text
        assert [s.index for s in spans] == list(range(len(spans)))


def test_default_size_fits_the_model(bundled_model):
    assert bundled_model.max_tokens == 254  # 256 less [CLS] and [SEP]
    long_text = " ".join(r["text"] for r in synthetic_records(10, seed=3))
    spans = Chunker(bundled_model.tokenizer, bundled_model.max_tokens).split(
        ParsedDocument("x", long_text)
    )
    assert len(spans) > 1
    for s in spans:
        assert len(bundled_model.tokenizer.encode(s.text).ids) <= 256


def test_markdown_heading_paths(tokenizer):
    data = (SAMPLES / "guides/setup.md").read_bytes()
    doc = parse_document("guides/setup.md", "setup.md", data)
    spans = Chunker(tokenizer, 24).split(doc)
    headings = {s.heading for s in spans}
    assert "Setting up the reindex worker > Scheduling" in headings
    sched = [s for s in spans if "cron" in s.text][0]
    assert sched.heading.endswith("Scheduling")


def test_headings_inside_code_fences_are_ignored():
    text = "# Top\n\n```\n# not a heading\n```\n\n## Sub\n\ntext"
    offsets, paths = heading_outline(text)
    assert paths == ["Top", "Top > Sub"]
    assert len(offsets) == 2


def test_korean_sentences_split_at_sentence_ends(tokenizer):
    text = (SAMPLES / "ko/security.txt").read_text(encoding="utf-8")
    spans = Chunker(tokenizer, 60).split(ParsedDocument("ko", text))
    assert len(spans) > 2
    # every chunk but the last ends at a sentence end or a line end: never mid-word
    for s in spans[:-1]:
        assert s.text.rstrip()[-1] in ".다요규정" or text[s.char_end : s.char_end + 1] in (
            "\n",
            " ",
            "",
        )


def test_pdf_chunks_carry_page_numbers(tokenizer):
    doc = parse_document("e.pdf", "e.pdf", (SAMPLES / "reports/expenses.pdf").read_bytes())
    spans = Chunker(tokenizer, 30).split(doc)
    assert spans[0].page_start == 1
    assert spans[-1].page_end == 2


def test_bad_settings_are_refused(tokenizer):
    with pytest.raises(ConfigurationError):
        Chunker(tokenizer, 32, overlap=32)


def test_a_piece_without_a_letter_or_digit_is_no_chunk(tokenizer):
    """Packing words up to the budget leaves a sentence's closing '.' as a piece of its
    own, often enough to matter (0.2 % of the chunks of benchmarks/ray_scale.py's corpus):
    it would be embedded and matched like a chunk. A piece of punctuation alone is dropped;
    the chunks around it keep their exact offsets, and a document of nothing else has none."""
    import random

    rng = random.Random(0)
    words = "index vector table night batch search source model chunk token lance".split()
    texts = [
        " ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + "." for _ in range(300)
    ]
    texts += ["비밀번호는 90일마다 변경합니다. 변경 주기는 보안팀이 정합니다."] * 3
    dropped = 0
    for chunker in (Chunker(None, 8, words=True), Chunker(tokenizer, 8)):
        for i, text in enumerate(texts):
            doc = ParsedDocument(f"d{i}", text, "")
            spans = chunker.split(doc)
            assert spans and all(any(c.isalnum() for c in s.text) for s in spans)
            assert [s.index for s in spans] == list(range(len(spans)))
            for s in spans:
                assert doc.text[s.char_start : s.char_end] == s.text
            covered = "".join(s.text for s in spans)
            dropped += sum(1 for c in text if c not in " ") - sum(1 for c in covered if c != " ")
    assert dropped > 0  # the corpus does produce such pieces: the guard above was exercised
    for chunker in (
        Chunker(None, 8, words=True),
        Chunker(tokenizer, 8),
        Chunker(tokenizer, 8, whole=True),
    ):
        assert chunker.split(ParsedDocument("p", " . -- ) ... ", "")) == []
