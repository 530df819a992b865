"""Chunk boundaries from one tokenisation of a document (tokenise once).

The document is encoded once with the model's tokenizer. Every candidate chunk is counted from
that encoding's token offsets, never by encoding the candidate again, and each chunk's input
ids are a slice of the same encoding with the model's special tokens around it, so the text the
model reads is tokenised exactly once, in the parse stage.

The boundaries, by level, highest first: Markdown headings (h1 to h6) and blocks (code fences,
rules); runs of newlines, longest first; sentence ends (Latin, CJK and Korean terminators);
words (whitespace); tokens. From each position the highest level whose next section fits the
budget is taken, and as many of its sections are packed as fit: what semantic-text-splitter
does, which counts each candidate by encoding it again.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~)[^\n]*(?:\n|$)", re.MULTILINE)
_RULE = re.compile(
    r"^[ \t]{0,3}(?:(?:\*[ \t]*){3,}|(?:-[ \t]*){3,}|(?:_[ \t]*){3,})$\n?", re.MULTILINE
)
_NEWLINES = re.compile(r"\n\s*")
# a sentence end: a terminator, closing quotes or brackets, then white space (Latin scripts,
# Korean '다.'), or a full-width terminator that needs none (Chinese, Japanese)
_SENTENCE = re.compile(r"[.!?…]+[\"'”’)\]»]*\s+|[。！？]+[\"'”’)\]»」』]*\s*")
# the same without white space, before a capital ('(P = .179).In'), unless a letter precedes
# the terminator ('U.S.A')
_TIGHT = re.compile(r"[.!?]+[\"'”’)\]»]*(?=[^\W\d_])")
_SPACE = re.compile(r"\s+")


#: tokens short of the budget a chunk encoded again from its text is cut (split_by_tokens)
SLACK = 2


@dataclass(frozen=True, slots=True)
class InputTemplate:
    """How a model's input ids wrap a text's own ids: [CLS] ids [SEP] for BERT, <s> ids </s>
    for RoBERTa/XLM-R, and the longest sequence the model reads (special tokens included)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    max_length: int
    lowercase: bool = False

    def wrap(self, ids: list[int]) -> list[int]:
        room = self.max_length - len(self.prefix) - len(self.suffix)
        return [*self.prefix, *ids[:room], *self.suffix]


@dataclass(frozen=True, slots=True)
class Piece:
    """A chunk's characters [start, end) and its tokens [first, last) in the encoding."""

    start: int
    end: int
    first: int
    last: int


def fence_lines(text: str) -> list[tuple[int, int]]:
    """Each code fence line's [start, end) (its line break included), in order."""
    return [(m.start(), m.end()) for m in _FENCE.finditer(text)]


def markdown_headings(
    text: str, fences: list[tuple[int, int]] | None = None
) -> list[tuple[int, int, str]]:
    """(start, depth, title) of each Markdown heading; a '#' line inside fenced code (an odd
    number of fences before it) is none."""
    starts = [s for s, _ in (fence_lines(text) if fences is None else fences)]
    return [
        (m.start(), len(m.group(1)), m.group(2).strip())
        for m in _HEADING.finditer(text)
        if bisect_right(starts, m.start()) % 2 == 0
    ]


def _markdown_levels(text: str) -> list[list[int]]:
    """Heading starts by depth (h1 first, each level holding the ones above it), then block
    boundaries (fences, rules)."""
    fences = fence_lines(text)
    by_depth: list[list[int]] = [[] for _ in range(6)]
    for start, depth, _ in markdown_headings(text, fences):
        by_depth[depth - 1].append(start)
    levels: list[list[int]] = []
    acc: list[int] = []
    for heads in by_depth:
        if heads:
            acc = sorted({*acc, *heads})
            levels.append(acc)
    blocks = [s for s, _ in fences[0::2]] + [e for _, e in fences[1::2]]
    blocks += [m.end() for m in _RULE.finditer(text)] + [m.start() for m in _RULE.finditer(text)]
    if blocks:
        levels.append(sorted({*acc, *blocks}))
    return levels


def _text_levels(text: str) -> list[Callable[[], list[int]]]:
    """Boundary lists from newline runs down to words, built when first needed."""
    runs = [(m.end(), m.group().count("\n")) for m in _NEWLINES.finditer(text)]
    counts = sorted({c for _, c in runs}, reverse=True)
    out = [_fixed([p for p, c in runs if c >= k]) for k in counts]

    def sentences() -> list[int]:
        found = []
        for m in _SENTENCE.finditer(text):
            end = m.end()
            # 'e.g. the', '3.5 mm': no sentence ends before a lower-case word
            if end < len(text) and not text[end].islower():
                found.append(end)
        for m in _TIGHT.finditer(text):
            if text[m.end()].isupper() and not (m.start() and text[m.start() - 1].isalpha()):
                found.append(m.end())
        return sorted({*found, *(p for p, _ in runs)})

    out.append(sentences)
    out.append(lambda: [m.end() for m in _SPACE.finditer(text)])
    return out


def _fixed(values: list[int]) -> Callable[[], list[int]]:
    return lambda: values


def split_by_tokens(
    text: str,
    starts: list[int],
    budget: int,
    overlap: int = 0,
    markdown: bool = False,
    clean: Callable[[int], bool] | None = None,
) -> list[Piece]:
    """Chunks of `text` of at most `budget` tokens, `starts` being the start offset of each of
    its tokens (one encoding of the whole text). Chunks are trimmed of white space; with
    `overlap`, neighbours share up to that many tokens, from a word's start.

    A chunk whose start is not `clean` (a position where the encoding's tokens do not depend
    on the text before it: see Chunker) is encoded again from its text, which can take a token
    or two more (a word's '##ization' starts a chunk as 'iz', '##ation'): such a chunk is cut
    SLACK tokens short of the budget."""
    n = len(text)
    lead = len(text) - len(text.lstrip())
    if lead >= n:
        return []
    built: list[list[int]] = []
    makers: list[Callable[[], list[int]]] = []
    if markdown:
        makers += [_fixed(bounds) for bounds in _markdown_levels(text)]
    makers += _text_levels(text)
    makers.append(_fixed(starts))

    def level(i: int) -> list[int]:
        while len(built) <= i:
            # each level holds every boundary of the levels above it, and the end of the text
            above = built[-1] if built else []
            built.append(sorted({*above, *makers[len(built)](), n}))
        return built[i]

    def tok(pos: int) -> int:
        return bisect_left(starts, pos)

    pieces: list[Piece] = []
    cursor = lead
    prev_end = lead
    while cursor < n:
        t0 = tok(cursor)
        room = budget
        if clean is not None and not clean(cursor):
            room = max(1, budget - SLACK)
        limit = starts[t0 + room] if t0 + room < len(starts) else n
        end = cursor
        for i in range(len(makers)):
            bounds = level(i)
            j = bisect_right(bounds, limit) - 1
            if j >= 0 and bounds[j] > cursor:
                end = bounds[j]
                break
        if end <= cursor:
            # more than the budget's tokens start at this one character (a character the
            # normaliser expands): it is a chunk of its own, over the budget, not a stall
            finest = level(len(makers) - 1)
            end = finest[bisect_right(finest, cursor)]
        if end <= prev_end and pieces:
            # an overlapped start that reaches no further than the last chunk: go on from it
            cursor = prev_end
            while cursor < n and text[cursor].isspace():
                cursor += 1
            continue
        s, e = cursor, end
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            pieces.append(Piece(s, e, tok(s), tok(e)))
        prev_end = end
        cursor = end
        if overlap and end < n:
            # back up at most `overlap` tokens before the end, to a word's start (none where
            # the last `overlap` tokens hold no word's start: never into the middle of a word)
            t_end = tok(end)
            back = max(t_end - overlap, t0 + 1)
            if back < t_end:
                words = level(len(makers) - 2)
                k = bisect_left(words, starts[back])
                if k < len(words) and words[k] < end:
                    cursor = words[k]
        while cursor < n and text[cursor].isspace():
            cursor += 1
    return pieces


def special_token_count(tokenizer: Tokenizer) -> int:
    """How many special tokens the tokenizer puts around a text's own ids ([CLS] [SEP]: 2)."""
    return len(tokenizer.encode("", add_special_tokens=True).ids)


def token_starts(text: str, offsets: list[tuple[int, int]], skip_space: bool) -> list[int]:
    """Each token's start offset; with `skip_space`, past the white space some tokenizers
    put in a token's offsets (a sentencepiece '▁word' that starts at the space before it), so
    that a word's first token starts at the word."""
    if not skip_space:
        return [s for s, _ in offsets]
    out = []
    for s, e in offsets:
        while s < e and text[s].isspace():
            s += 1
        out.append(s)
    return out


_PROBE = "Alpha beta, gamma.  Delta\nepsilon 42 café 한국어 (zeta).Eta theta-iota\n\nkappa lambda."


def offsets_cover_space(tokenizer: Tokenizer) -> bool:
    """Whether a token's offsets can start at the white space before its word."""
    enc = tokenizer.encode(_PROBE, add_special_tokens=False)
    return any(s < e and _PROBE[s].isspace() for s, e in enc.offsets)


def _isolated(ch: str) -> bool:
    """Punctuation (BERT's: ASCII symbols too) or a CJK ideograph: characters BERT-style
    pre-tokenizers make tokens of their own."""
    import unicodedata

    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    if unicodedata.category(ch).startswith("P"):
        return True
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0xF900 <= cp <= 0xFAFF
        or 0x20000 <= cp <= 0x2FA1F
    )


def is_clean(text: str, pos: int, isolates: bool) -> bool:
    """Whether a cut at `pos` leaves both sides' tokens as the whole text's encoding has them:
    at white space (for a tokenizer whose slices are exact), and with a tokenizer that
    `isolates` punctuation and CJK ideographs (BERT's), next to one of those."""
    if pos <= 0 or pos >= len(text):
        return True
    before, after = text[pos - 1], text[pos]
    if before.isspace() or after.isspace():
        return True
    return isolates and (_isolated(before) or _isolated(after))


_PUNCT_PROBE = "甲乙。丙丁(zeta).Eta,theta:iota[kappa]lambda 中文mu"


def isolates_punctuation(tokenizer: Tokenizer) -> bool:
    """Whether cuts next to punctuation and CJK ideographs give exact slices, checked on a
    probe cut at each such position (True for BERT's pre-tokenizer, False for sentencepiece,
    which marks only a word after a space)."""
    text = _PUNCT_PROBE
    enc = tokenizer.encode(text, add_special_tokens=False)
    starts = token_starts(text, enc.offsets, offsets_cover_space(tokenizer))
    for p in range(1, len(text)):
        if not (_isolated(text[p - 1]) or _isolated(text[p])) or text[p - 1 : p + 1].isspace():
            continue
        for a, b in ((0, p), (p, len(text))):
            own = tokenizer.encode(text[a:b], add_special_tokens=False).ids
            if own != enc.ids[bisect_left(starts, a) : bisect_left(starts, b)]:
                return False
    return True


def input_template(
    tokenizer: Tokenizer, max_length: int, lowercase: bool = False
) -> InputTemplate | None:
    """How this tokenizer's input ids wrap a text's own, found by encoding a probe with and
    without special tokens; None where a slice of a document's encoding is not the encoding
    of the slice's text, checked on a probe document cut at every pair of its words: byte-level
    BPE (GPT-2, RoBERTa) marks a word after a space differently from a text's first word, and
    so does a sentencepiece tokenizer that adds no '▁' before a text's first word. Chunks of
    those are encoded from their text."""
    text = _PROBE.lower() if lowercase else _PROBE
    enc = tokenizer.encode(text, add_special_tokens=False)
    starts = token_starts(text, enc.offsets, offsets_cover_space(tokenizer))
    words = [0] + [m.end() for m in _SPACE.finditer(text)]
    for i, p in enumerate(words):
        for q in [*words[i + 1 :], len(text)]:
            end = len(text[:q].rstrip())
            own = tokenizer.encode(text[p:end], add_special_tokens=False).ids
            if own != enc.ids[bisect_left(starts, p) : bisect_left(starts, end)]:
                return None
    probe = "lanceflow probe text"
    core = tokenizer.encode(probe, add_special_tokens=False).ids
    full = tokenizer.encode(probe, add_special_tokens=True).ids
    for at in range(len(full) - len(core) + 1):
        if full[at : at + len(core)] == core:
            return InputTemplate(
                tuple(full[:at]), tuple(full[at + len(core) :]), max_length, lowercase
            )
    return None
