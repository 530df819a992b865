"""Cutting documents into chunks counted in the embedding model's own tokens.

The splitting tries Markdown structure (for Markdown), then paragraphs, lines, sentences
(Korean '다.' endings and CJK full stops too), words and only then tokens, and packs the largest
pieces that fit the token budget. With a local model's tokenizer each document is encoded once
(tasks.token_splitter); with tiktoken (OpenAI) or the hash embedder's word budget,
semantic-text-splitter does the same in Rust.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.errors import ConfigurationError
from tasks.parsing import ParsedDocument
from tasks.token_splitter import (
    InputTemplate,
    Piece,
    input_template,
    is_clean,
    isolates_punctuation,
    markdown_headings,
    offsets_cover_space,
    split_by_tokens,
    token_starts,
)

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Tokenizer

#: texts -> the model's input ids for each (special tokens included)
TokenEncoder = Callable[[list[str]], list["np.ndarray"]]


@dataclass(slots=True)
class ChunkSpan:
    """One chunk of one document."""

    doc_id: str
    index: int
    text: str
    char_start: int
    char_end: int
    heading: str = ""
    page_start: int | None = None
    page_end: int | None = None
    #: the model's input ids, when the chunker was given the model's encoder: the model then
    #: reads these and does not tokenise the text again (dropped once the chunk is embedded)
    token_ids: np.ndarray | None = None


def heading_outline(
    text: str, stack: list[tuple[int, str]] | None = None
) -> tuple[list[int], list[str]]:
    """Start offsets of the Markdown headings and the heading path in force at each.

    `stack` carries the open headings from an earlier segment of the same document in, and
    this segment's out (it is updated in place)."""
    offsets: list[int] = []
    paths: list[str] = []
    stack = [] if stack is None else stack
    for start, level, title in markdown_headings(text):
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        offsets.append(start)
        paths.append(" > ".join(t for _, t in stack))
    return offsets, paths


def has_content(text: str) -> bool:
    """Whether a piece holds a letter or a digit, in any script. The splitter packs words up
    to the budget and may leave the sentence's closing '.' (or a lone ')', a run of dashes)
    as a piece of its own: such a chunk says nothing, yet would be embedded, stored and
    matched (a real model gives it a generic vector near the middle of the space; the hash
    embedder a zero vector, which the cosine vector index leaves out)."""
    return any(ch.isalnum() for ch in text)


class Chunker:
    """Splits parsed documents with one tokenizer and one budget.

    With the model's own tokenizer, each document is encoded once (tasks.token_splitter):
    the chunks are counted from that encoding, and with `template` (how the model's input
    ids wrap a text's) each chunk carries its slice of it as the model's input ids. `encoder`
    encodes chunk texts instead where a slice may not be the text's own encoding: a tokenizer
    whose slices the probe found inexact (byte-level BPE; sentencepiece that marks no first
    word), a chunk cut inside a word, a document that lowercasing lengthens. The OpenAI
    (tiktoken) and hash (word) budgets go through semantic-text-splitter, which counts in
    Rust."""

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        chunk_tokens: int,
        overlap: int = 0,
        whole: bool = False,
        tiktoken_model: str | None = None,
        words: bool = False,
        encoder: TokenEncoder | None = None,
        template: InputTemplate | None = None,
    ) -> None:
        if chunk_tokens < 8:
            raise ConfigurationError("chunk_tokens must be at least 8")
        if overlap >= chunk_tokens:
            raise ConfigurationError(
                f"overlap ({overlap}) must be smaller than chunk_tokens ({chunk_tokens})"
            )
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.whole = whole
        self.encoder = encoder
        self.template = template if encoder is not None else None
        self.tokenizer: Tokenizer | None = None
        self._text: Any = None
        self._markdown: Any = None
        if tiktoken_model is not None:
            from semantic_text_splitter import MarkdownSplitter, TextSplitter

            # tiktoken's BPE, compiled into the splitter: no download
            self._text = TextSplitter.from_tiktoken_model(
                tiktoken_model, chunk_tokens, overlap=overlap
            )
            self._markdown = MarkdownSplitter.from_tiktoken_model(
                tiktoken_model, chunk_tokens, overlap=overlap
            )
        elif words:
            from semantic_text_splitter import MarkdownSplitter, TextSplitter

            # the hash embedder's budget: about 5 characters a word (the splitter counts
            # characters in Rust, far faster than a Python word-count callback)
            self._text = TextSplitter(chunk_tokens * 5, overlap=overlap * 5)
            self._markdown = MarkdownSplitter(chunk_tokens * 5, overlap=overlap * 5)
        elif tokenizer is not None:
            self.tokenizer = tokenizer
            self._skip_space = offsets_cover_space(tokenizer)
            # whether a slice of a document's encoding cut at white space is its text's own
            # encoding, and cut next to punctuation or a CJK ideograph too (BERT's): where not,
            # a chunk is encoded from its text, and its budget keeps some slack
            self._exact = (template or input_template(tokenizer, chunk_tokens)) is not None
            self._isolates = self._exact and isolates_punctuation(tokenizer)
        else:
            raise ConfigurationError("a chunker needs a tokenizer")

    def split(
        self,
        doc: ParsedDocument,
        first_index: int = 0,
        char_base: int = 0,
        headings: list[tuple[int, str]] | None = None,
    ) -> list[ChunkSpan]:
        """Chunks of a document, or of one segment of a long one: `first_index` and
        `char_base` place the segment in its document, `headings` carries the open Markdown
        headings from segment to segment."""
        if self.tokenizer is not None:
            return self._split_tokens(doc, first_index, char_base, headings)
        if self.whole:
            text = doc.text.strip()
            start = doc.text.find(text[:1]) if text else 0
            pieces = [(start, start + len(text))] if text else []
        else:
            splitter = self._markdown if doc.markdown else self._text
            pieces = [(s, s + len(p)) for s, p in splitter.chunk_indices(doc.text)]
        spans = [s for s, _ in self._spans(doc, pieces, first_index, char_base, headings)]
        self._encode(spans)
        return spans

    def _split_tokens(
        self,
        doc: ParsedDocument,
        first_index: int,
        char_base: int,
        headings: list[tuple[int, str]] | None,
    ) -> list[ChunkSpan]:
        """The document encoded once; chunks counted from, and their ids sliced from, it."""
        assert self.tokenizer is not None
        text = doc.text
        template = self.template
        if template is not None and template.lowercase:
            lowered = text.lower()
            # the model reads lowercased text; a slice is valid only where offsets still match
            text, template = (lowered, template) if len(lowered) == len(text) else (text, None)
        encoding = self.tokenizer.encode_batch([text], add_special_tokens=False)[0]
        ids: list[int] = encoding.ids
        starts = token_starts(text, encoding.offsets, self._skip_space)
        clean = self._clean(text)
        if self.whole:
            body = doc.text.strip()
            lead = doc.text.find(body[:1]) if body else 0
            first = bisect_left(starts, lead)
            pieces = [Piece(lead, lead + len(body), first, len(ids))] if body else []
        else:
            pieces = split_by_tokens(
                doc.text, starts, self.chunk_tokens, self.overlap, doc.markdown, clean
            )
        spans = self._spans(
            doc, [(p.start, p.end) for p in pieces], first_index, char_base, headings
        )
        if template is None:
            self._encode([s for s, _ in spans])
            return [s for s, _ in spans]
        import numpy as np

        cut: list[ChunkSpan] = []
        for span, i in spans:
            piece = pieces[i]
            if clean(piece.start) and clean(piece.end):
                span.token_ids = np.asarray(
                    template.wrap(ids[piece.first : piece.last]), dtype=np.int32
                )
            else:
                # cut inside a word (a word longer than the budget; for sentencepiece, a
                # sentence end with no space after it): a slice there may start with a word's
                # continuation token, which the chunk's own encoding has not, so this chunk is
                # encoded from its text
                cut.append(span)
        self._encode(cut)
        return [s for s, _ in spans]

    def _clean(self, text: str) -> Callable[[int], bool]:
        """Where a cut leaves exact slices on both sides (tasks.token_splitter.is_clean)."""
        if not self._exact:
            return lambda pos: pos <= 0 or pos >= len(text)
        return lambda pos: is_clean(text, pos, self._isolates)

    def _encode(self, spans: list[ChunkSpan]) -> None:
        if self.encoder is not None and spans:
            for span, ids in zip(spans, self.encoder([s.text for s in spans]), strict=True):
                span.token_ids = ids

    def _spans(
        self,
        doc: ParsedDocument,
        pieces: list[tuple[int, int]],
        first_index: int,
        char_base: int,
        headings: list[tuple[int, str]] | None,
    ) -> list[tuple[ChunkSpan, int]]:
        """Chunk spans of the pieces that say something, each with its piece's position;
        headings and pages placed."""
        inherited = " > ".join(t for _, t in headings) if headings else ""
        offsets, paths = heading_outline(doc.text, headings) if doc.markdown else ([], [])
        out: list[tuple[ChunkSpan, int]] = []
        for k, (start, end) in enumerate(pieces):
            piece = doc.text[start:end]
            if not has_content(piece):
                continue
            span = ChunkSpan(
                doc.doc_id, first_index + len(out), piece, char_base + start, char_base + end
            )
            span.heading = inherited
            if offsets:
                i = bisect_right(offsets, start) - 1
                if i >= 0:
                    span.heading = paths[i]
            if doc.page_starts:
                span.page_start = bisect_right(doc.page_starts, start)
                span.page_end = bisect_right(doc.page_starts, max(start, end - 1))
            out.append((span, k))
        return out
