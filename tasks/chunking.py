"""Cutting documents into chunks counted in the embedding model's own tokens.

The splitting tries Markdown structure (for Markdown), then paragraphs, lines, sentences
(Korean '다.' endings and CJK full stops too), words and only then tokens, and packs the largest
pieces that fit the token budget. With a local model's tokenizer each document is encoded once
(tasks.token_splitter); with tiktoken (OpenAI) or the hash embedder's word budget,
semantic-text-splitter does the same in Rust.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.errors import ConfigurationError
from tasks.parsing import ParsedDocument
from tasks.token_splitter import (
    SLACK,
    InputTemplate,
    Piece,
    input_template,
    is_clean,
    isolates_punctuation,
    markdown_headings,
    offsets_cover_space,
    special_token_count,
    split_by_tokens,
    token_starts,
)

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

#: rounds of splitting a chunk again that its own encoding finds over the budget
REFITS = 3

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
        self._special_count: int | None = None
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
        opened = list(headings) if headings is not None else None
        # the ids of the chunks a round kept, by their characters: a re-split round encodes
        # only the pieces it made
        known: dict[tuple[int, int], Any] = {}
        for refit in range(REFITS + 1):
            if refit and headings is not None and opened is not None:
                headings[:] = opened  # _spans walks this segment's headings again
            spans = self._spans(
                doc, [(p.start, p.end) for p in pieces], first_index, char_base, headings
            )
            from_text = self._assign_ids(spans, pieces, ids, template, clean, known)
            if self.whole or not from_text:
                break
            over = self._over_budget(text, pieces, from_text)
            if not over:
                break
            for span, i in spans:
                if i not in over:
                    known[(pieces[i].start, pieces[i].end)] = span.token_ids
            split = (
                self._refit(doc.text, text, starts, pieces, over, doc.markdown, refit)
                if refit < REFITS
                else pieces
            )
            kept = {(p.start, p.end) for p in split}
            stuck = [i for i in over if (pieces[i].start, pieces[i].end) in kept]
            for span, i in spans:
                if i in stuck:
                    # no cut left in it (a character the tokenizer expands into more tokens
                    # than the budget), or the last round: as it is, and said
                    known[(pieces[i].start, pieces[i].end)] = span.token_ids
                    log.warning(
                        "document %s: the chunk at characters %d-%d has %d tokens, over "
                        "chunk_tokens=%d, and cannot be split further; the model reads no "
                        "more of it than its own limit",
                        doc.doc_id,
                        span.char_start,
                        span.char_end,
                        over[i],
                        self.chunk_tokens,
                    )
            if len(stuck) == len(over):
                break
            pieces = split
        return [s for s, _ in spans]

    def _assign_ids(
        self,
        spans: list[tuple[ChunkSpan, int]],
        pieces: list[Piece],
        ids: list[int],
        template: InputTemplate | None,
        clean: Callable[[int], bool],
        known: dict[tuple[int, int], Any],
    ) -> list[tuple[ChunkSpan, int]]:
        """Each chunk's input ids: its slice of the document's encoding where that is its
        own encoding, else its text encoded (by the encoder, when there is one); `known`,
        those of an earlier round. Returns the chunks whose count may differ from their
        slice's (those not sliced at clean cuts) and were not known."""
        import numpy as np

        from_text: list[tuple[ChunkSpan, int]] = []
        todo: list[ChunkSpan] = []
        for span, i in spans:
            piece = pieces[i]
            if (piece.start, piece.end) in known:
                span.token_ids = known[(piece.start, piece.end)]
                continue
            todo.append(span)
            if self._exact and clean(piece.start) and clean(piece.end):
                if template is not None:
                    span.token_ids = np.asarray(
                        template.wrap(ids[piece.first : piece.last]), dtype=np.int32
                    )
            else:
                # cut inside a word (a word longer than the budget; for sentencepiece, a
                # sentence end with no space after it), or a tokenizer whose slices are not
                # exact: a slice may start with a word's continuation token, which the
                # chunk's own encoding has not, so this chunk is encoded from its text
                from_text.append((span, i))
        if template is None:
            self._encode(todo)
        else:
            self._encode([s for s, _ in from_text])
        return from_text

    def _over_budget(
        self, text: str, pieces: list[Piece], from_text: list[tuple[ChunkSpan, int]]
    ) -> dict[int, int]:
        """The pieces (index -> own token count) of chunks encoded from their text that hold
        more than chunk_tokens tokens of their own: counted from a slice of the document's
        encoding, such a chunk may take a few more than its slice (SLACK covers a token or
        two), and the model would truncate what is past its limit. Counted from the ids the
        encoder gave (its special tokens aside); encoded untruncated only where those reach
        the budget, or where there is no encoder (the model tokenises the text itself)."""
        assert self.tokenizer is not None
        check: list[tuple[int, str]] = []
        for span, i in from_text:
            if span.token_ids is not None:
                if len(span.token_ids) - self._specials() < self.chunk_tokens:
                    continue
            piece = pieces[i]
            check.append((i, text[piece.start : piece.end]))
        if not check:
            return {}
        counts = self.tokenizer.encode_batch([t for _, t in check], add_special_tokens=False)
        found = ((i, len(e.ids)) for (i, _), e in zip(check, counts, strict=True))
        return {i: n for i, n in found if n > self.chunk_tokens}

    def _refit(
        self,
        source: str,
        text: str,
        starts: list[int],
        pieces: list[Piece],
        over: dict[int, int],
        markdown: bool,
        refit: int,
    ) -> list[Piece]:
        """The pieces, each one over the budget split again, counted in its own encoding
        (which is what the model reads of it) and SLACK tokens tighter each round: cut where
        the document's own text has its boundaries (`source`; `text` is what the tokenizer
        reads, lowercased for some models), its sub-pieces overlapping as the chunks do. A
        piece that a neighbour holds whole (with overlap) is left out."""
        assert self.tokenizer is not None
        out: list[Piece] = []
        budget = max(1, self.chunk_tokens - SLACK * (refit + 1))
        overlap = self.overlap if self.overlap < budget else 0
        for i, piece in enumerate(pieces):
            if i not in over:
                out.append(piece)
                continue
            enc = self.tokenizer.encode(text[piece.start : piece.end], add_special_tokens=False)
            sub = source[piece.start : piece.end]
            own = token_starts(sub, enc.offsets, self._skip_space)
            for p in split_by_tokens(sub, own, budget, overlap, markdown, self._clean(sub)):
                a, b = piece.start + p.start, piece.start + p.end
                out.append(Piece(a, b, bisect_left(starts, a), bisect_left(starts, b)))
        kept: list[Piece] = []
        for piece in out:
            # with overlap, a sub-piece may lie wholly inside its neighbour, before or after
            # it: its text would be embedded twice
            while kept and kept[-1].start >= piece.start and kept[-1].end <= piece.end:
                kept.pop()
            if not kept or piece.end > kept[-1].end:
                kept.append(piece)
        return kept

    def _specials(self) -> int:
        """How many special tokens the model's ids put around a text's own."""
        if self._special_count is None:
            assert self.tokenizer is not None
            self._special_count = special_token_count(self.tokenizer)
        return self._special_count

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
