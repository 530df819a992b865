"""Pure units: chunk boundaries, token limits, offsets, headings and pages."""

from __future__ import annotations

import random

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
    # a rule longer than the budget: its pieces are punctuation alone, whichever splitter cuts
    texts += ["index the night batch.\n\n" + "- " * 30 + "\n\nsearch the table."] * 2
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


def _bert_template(tokenizer):
    from tasks.token_splitter import input_template

    return input_template(tokenizer, 256)


def test_each_chunks_ids_are_its_texts_own_encoding(tokenizer):
    """Tokenise once: a chunk's ids are a slice of its document's one encoding, and equal
    what the model's tokenizer gives the chunk's text (English, Korean, Markdown, PDF), the
    special tokens around them; the budget holds counted that way too."""
    template = _bert_template(tokenizer)
    assert template is not None and template.prefix == (101,) and template.suffix == (102,)
    encoded = []

    def encoder(texts):  # for a chunk cut inside a word
        encoded.extend(texts)
        return [e.ids for e in tokenizer.encode_batch(texts)]

    docs = [
        ParsedDocument(r["_id"], r["title"] + "\n\n" + r["text"], r["title"])
        for r in synthetic_records(30, seed=5)
    ]
    for path in ("ko/security.txt", "guides/setup.md", "reports/expenses.pdf"):
        docs.append(parse_document(path, path, (SAMPLES / path).read_bytes()))
    # a word longer than any budget here, and a sentence end with no space after it
    # (under WordPiece's 100 characters, over which a word is one [UNK])
    docs.append(ParsedDocument("w", "see " + "x".join(map(str, range(30))) + " for it."))
    tight = "The first trial held for all of its patients (P = .179).In the second it did not."
    docs.append(ParsedDocument("t", tight + " " + tight))
    total = 0
    for size, overlap in ((24, 0), (64, 8), (254, 0)):
        chunker = Chunker(tokenizer, size, overlap, encoder=encoder, template=template)
        for doc in docs:
            for s in chunker.split(doc):
                total += 1
                own = tokenizer.encode(s.text).ids
                assert s.token_ids is not None and list(s.token_ids) == own
                assert len(own) <= size + 2
    # only the chunks cut inside a word were encoded from their text: the rest are slices
    assert 0 < len(encoded) < total / 10


def test_overlap_shares_at_most_the_budgeted_tokens(tokenizer):
    text = " ".join(r["text"] for r in synthetic_records(6, seed=7))
    spans = Chunker(tokenizer, 40, overlap=10).split(ParsedDocument("o", text))
    shared = []
    for a, b in zip(spans, spans[1:], strict=False):
        assert a.char_start < b.char_start < a.char_end <= b.char_end or b.char_start >= a.char_end
        if b.char_start < a.char_end:
            shared.append(len(tokenizer.encode(text[b.char_start : a.char_end]).ids) - 2)
    assert shared and max(shared) <= 10 and min(shared) > 0
    # the chunks still cover every word
    covered = set()
    for s in spans:
        covered.update(range(s.char_start, s.char_end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_boundaries_prefer_headings_paragraphs_then_sentences(tokenizer):
    from tasks.token_splitter import split_by_tokens

    def cut(text, budget, markdown=False):
        enc = tokenizer.encode(text, add_special_tokens=False)
        starts = [o[0] for o in enc.offsets]
        return [text[p.start : p.end] for p in split_by_tokens(text, starts, budget, 0, markdown)]

    md = "# A\n\nalpha beta gamma.\n\n## B\n\ndelta epsilon.\n\n# C\n\nzeta eta theta."
    assert cut(md, 12, markdown=True) == [
        "# A\n\nalpha beta gamma.\n\n## B\n\ndelta epsilon.",
        "# C\n\nzeta eta theta.",
    ]
    # a fenced block's '#' line is no heading
    fenced = "# A\n\n```\n# not a heading\nx = 1\n```\n\nafter the code."
    assert all(not p.startswith("# not") for p in cut(fenced, 10, markdown=True))
    text = "First sentence here. Second one (P = .179).Third starts tight. Fourth e.g. the rest."
    assert cut(text, 9) == [
        "First sentence here.",
        "Second one (P = .179).",
        "Third starts tight.",
        "Fourth e.g. the rest.",  # no sentence ends before a lower-case word
    ]
    assert cut("第一句话很长。第二句话也很长。第三句。", 8) == [
        "第一句话很长。",
        "第二句话也很长。",
        "第三句。",
    ]
    assert cut("   \n  ", 8) == []


def test_a_byte_level_tokenizer_gets_no_slices():
    """GPT-2/RoBERTa's byte-level BPE encodes a word after a space differently from a
    text's first word: a slice of the document's encoding is not the chunk's own, which the
    probe finds, so those chunks are encoded from their text (the chunker's encoder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tasks.token_splitter import input_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [p.read_text(encoding="utf-8") for p in SAMPLES.rglob("*.md")]
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts * 3, trainer)
    assert input_template(tok, 128) is None
    calls = []

    def encoder(texts):
        calls.append(len(texts))
        return [e.ids for e in tok.encode_batch(texts)]

    text = " ".join(r["text"] for r in synthetic_records(4, seed=13))
    spans = Chunker(tok, 32, encoder=encoder, template=None).split(ParsedDocument("b", text))
    assert len(spans) > 2 and calls == [len(spans)]
    assert all(list(s.token_ids) == tok.encode(s.text).ids for s in spans)


def _sentencepiece_like(prepend_scheme: str):
    """A small BPE over Metaspace pre-tokenization, trained here on the sample corpus (no
    download): sentencepiece's shape, whose '▁word' token's offsets start at the space."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    texts = [p.read_text(encoding="utf-8") for p in SAMPLES.rglob("*.md")]
    texts += [p.read_text(encoding="utf-8") for p in SAMPLES.rglob("*.txt")]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace("\n", " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(texts * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return tok


@pytest.mark.parametrize("scheme", ["always", "never"])
def test_sentencepiece_shaped_tokenizers(scheme):
    """'▁word' tokens whose offsets start at the space before the word: a chunk's slice still
    starts with its first word's token ('always'); where a text's first word gets no '▁'
    ('never'), slices are not the chunks' own encodings, which the probe finds, and every chunk
    is encoded from its text. Either way each chunk's ids are its text's own encoding."""
    from tasks.token_splitter import input_template, offsets_cover_space

    tok = _sentencepiece_like(scheme)
    assert offsets_cover_space(tok)
    template = input_template(tok, 512)
    assert (template is not None) == (scheme == "always")
    encoded = []

    def encoder(texts):
        encoded.extend(texts)
        return [e.ids for e in tok.encode_batch(texts)]

    text = " ".join(r["text"] for r in synthetic_records(8, seed=11))
    chunker = Chunker(tok, 40, encoder=encoder, template=template)
    spans = chunker.split(ParsedDocument("s", text))
    assert len(spans) > 5
    for s in spans:
        own = tok.encode(s.text).ids
        assert list(s.token_ids) == own
        assert len(own) <= 40 + 2
    if scheme == "always":
        assert not encoded  # all slices
    else:
        assert len(encoded) == len(spans)


def test_many_tokens_at_one_character_do_not_stall():
    """A character its normaliser expands into more tokens than the budget is a chunk of its
    own (over the budget) rather than a cut that never moves."""
    from tasks.token_splitter import split_by_tokens

    text = "ab\ufdfa cd"
    starts = [0, 1] + [2] * 20 + [4]
    pieces = split_by_tokens(text, starts, 8)
    assert [text[p.start : p.end] for p in pieces] == ["ab", "\ufdfa", "cd"]


def test_a_chunk_its_own_encoding_finds_over_the_budget_is_split_again():
    """Counted from a slice of its document's encoding, a chunk may take more tokens of its
    own than SLACK covers: in this byte-level BPE a word after a space is one token and the
    same word starting a text six. Such a chunk is split again, in its own encoding, so no
    chunk's ids pass the budget and the model truncates nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges, word = [], "Ġ"
    for ch in "Qwerty":
        merges.append((word, ch))
        word += ch
        vocab[word] = len(vocab)
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = None
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    assert len(tok.encode(" Qwerty", add_special_tokens=False).ids) == 1
    assert len(tok.encode("Qwerty", add_special_tokens=False).ids) == 6
    budget = 16
    model = Tokenizer.from_str(tok.to_str())
    model.enable_truncation(budget + 2)  # what the model reads, as LocalEmbedder's does
    rounds = []

    def encoder(texts):
        rounds.append(len(texts))
        return [e.ids for e in model.encode_batch(texts)]

    text = " ".join(["Qwerty"] * 60)
    spans = Chunker(tok, budget, encoder=encoder, template=None).split(ParsedDocument("q", text))
    for s in spans:
        own = tok.encode(s.text).ids
        assert len(own) <= budget + 2 and list(s.token_ids) == own  # nothing truncated
    assert sum(s.text.count("Qwerty") for s in spans) == 60  # every word, once
    assert [s.index for s in spans] == list(range(len(spans)))
    assert len(rounds) > 1  # the first cut did overflow: chunks were split again
    # where the model tokenises the text itself (no encoder), the chunks are counted the same
    bare = Chunker(tok, budget).split(ParsedDocument("q", text))
    assert [s.text for s in bare] == [s.text for s in spans]
    # with overlap, split again chunks still overlap as chunks do, and none lies wholly
    # inside the chunk before it (its text would be embedded twice)
    rng = random.Random(0)
    words = ["Qwerty", "ab", "Qwerty.", "cd"]
    paragraphs = (" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(40))
    doc = ParsedDocument("o", "\n\n".join(paragraphs))
    rounds.clear()
    spans = Chunker(tok, budget, 6, encoder=encoder, template=None).split(doc)
    assert len(rounds) > 1
    for a, b in zip(spans, spans[1:], strict=False):
        assert b.char_start > a.char_start and b.char_end > a.char_end
        assert len(tok.encode(b.text, add_special_tokens=False).ids) <= budget
    assert sum(b.char_start < a.char_end for a, b in zip(spans, spans[1:], strict=False)) > 100
