"""Cutting documents into chunks counted in the embedding model's own tokens.

semantic-text-splitter does the splitting: it tries Markdown structure (for Markdown), then
paragraphs, lines, sentences (Unicode sentence boundaries, so Korean '다.' endings too), words
and only then characters, and packs the largest pieces that fit the token budget.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.errors import ConfigurationError
from tasks.parsing import ParsedDocument

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Tokenizer

#: texts -> the model's input ids for each (special tokens included)
TokenEncoder = Callable[[list[str]], list["np.ndarray"]]

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)


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
    fences = [m.start() for m in _FENCE.finditer(text)]
    offsets: list[int] = []
    paths: list[str] = []
    stack = [] if stack is None else stack
    for m in _HEADING.finditer(text):
        # inside a fenced code block when an odd number of fences precede it
        if bisect_right(fences, m.start()) % 2 == 1:
            continue
        level = len(m.group(1))
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, m.group(2).strip()))
        offsets.append(m.start())
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
    """Splits parsed documents with one tokenizer and one budget."""

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        chunk_tokens: int,
        overlap: int = 0,
        whole: bool = False,
        tiktoken_model: str | None = None,
        words: bool = False,
        encoder: TokenEncoder | None = None,
    ) -> None:
        from semantic_text_splitter import MarkdownSplitter, TextSplitter

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
        self._text: Any
        self._markdown: Any
        if tiktoken_model is not None:
            # tiktoken's BPE, compiled into the splitter: no download
            self._text = TextSplitter.from_tiktoken_model(
                tiktoken_model, chunk_tokens, overlap=overlap
            )
            self._markdown = MarkdownSplitter.from_tiktoken_model(
                tiktoken_model, chunk_tokens, overlap=overlap
            )
        elif words:
            # the hash embedder's budget: about 5 characters a word (the splitter counts
            # characters in Rust, far faster than a Python word-count callback)
            self._text = TextSplitter(chunk_tokens * 5, overlap=overlap * 5)
            self._markdown = MarkdownSplitter(chunk_tokens * 5, overlap=overlap * 5)
        elif tokenizer is not None:
            self._text = TextSplitter.from_huggingface_tokenizer(
                tokenizer, chunk_tokens, overlap=overlap
            )
            self._markdown = MarkdownSplitter.from_huggingface_tokenizer(
                tokenizer, chunk_tokens, overlap=overlap
            )
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
        spans = self._split(doc, first_index, char_base, headings)
        if self.encoder is not None and spans:
            for span, ids in zip(spans, self.encoder([s.text for s in spans]), strict=True):
                span.token_ids = ids
        return spans

    def _split(
        self,
        doc: ParsedDocument,
        first_index: int,
        char_base: int,
        headings: list[tuple[int, str]] | None,
    ) -> list[ChunkSpan]:
        if self.whole:
            text = doc.text.strip()
            start = doc.text.find(text[:1]) if text else 0
            if not has_content(text):
                return []
            return [ChunkSpan(doc.doc_id, 0, text, start, start + len(text))]
        splitter = self._markdown if doc.markdown else self._text
        inherited = " > ".join(t for _, t in headings) if headings else ""
        offsets, paths = heading_outline(doc.text, headings) if doc.markdown else ([], [])
        spans: list[ChunkSpan] = []
        for start, piece in splitter.chunk_indices(doc.text):
            if not has_content(piece):
                continue
            end = start + len(piece)
            span = ChunkSpan(
                doc.doc_id, first_index + len(spans), piece, char_base + start, char_base + end
            )
            span.heading = inherited
            if offsets:
                i = bisect_right(offsets, start) - 1
                if i >= 0:
                    span.heading = paths[i]
            if doc.page_starts:
                span.page_start = bisect_right(doc.page_starts, start)
                span.page_end = bisect_right(doc.page_starts, max(start, end - 1))
            spans.append(span)
        return spans
