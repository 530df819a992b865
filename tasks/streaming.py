"""Long text documents in bounded pieces: read, decode, chunk, embed and write a segment at a
time, so memory does not grow with a document's size.

A text or Markdown file larger than STREAM_MIN_BYTES (by its listed size) is not read whole.
It is hashed in one streamed pass (an unchanged file whose time moved costs no more), then
decoded incrementally and cut into segments of about SEGMENT_BYTES at paragraph breaks; each
segment is cleaned, chunked (chunk indices, offsets and open headings carry over), embedded and
upserted. Every chunk row carries the document's content hash (`doc_version`); once the last
segment is written, the document's rows of any other version are deleted and then the manifest
row is written. A crash in between leaves the old manifest row, so the next run processes the
document again and converges to the same rows.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from tasks.chunking import Chunker, ChunkSpan
from tasks.errors import ParseError, ReadError
from tasks.parsing import MARKDOWN_EXTENSIONS, ParsedDocument, clean_text, first_heading
from tasks.sources import Source

log = logging.getLogger(__name__)

#: text documents above this listed size are processed in segments
STREAM_MIN_BYTES = 4 * 2**20
#: bytes read per segment (a segment ends at the last paragraph break within it)
SEGMENT_BYTES = 2**20
_READ_BYTES = 1 << 16
STREAMABLE = (".txt", ".md", ".markdown", ".rst")


def streamable(name: str, size: int) -> bool:
    return size > STREAM_MIN_BYTES and name.lower().endswith(STREAMABLE)


def _open(source: Source, path: str) -> Any:
    try:
        return source.fs.open(path, "rb")
    except PermissionError as exc:
        raise ReadError("permission denied: make the file readable") from exc
    except FileNotFoundError as exc:
        raise ReadError("file vanished while the run was reading") from exc
    except OSError as exc:
        from tasks.storage import redact_text

        raise ReadError(f"cannot read: {redact_text(str(exc.strerror or exc))}") from None


def hash_file(source: Source, path: str, max_bytes: int) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in blocks."""
    h = hashlib.sha256()
    size = 0
    with _open(source, path) as fh:
        for block in iter(lambda: fh.read(_READ_BYTES), b""):
            size += len(block)
            if size > max_bytes:
                raise ReadError(
                    f"larger than max_file_mb ({max_bytes / 2**20:g} MB): raise the limit or "
                    "split the file"
                )
            h.update(block)
    return h.hexdigest(), size


def _encoding_of(head: bytes) -> str:
    if head.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if not head.strip():
        raise ParseError("empty file")
    if b"\x00" in head[:8192]:
        raise ParseError("binary content under a text extension (NUL bytes)")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(head).best()
    if best is None:
        raise ParseError("undecodable text: no character encoding fits; convert it to UTF-8")
    return str(best.encoding)


def iter_segments(source: Source, path: str) -> Iterator[str]:
    """The document's text in cleaned segments of about SEGMENT_BYTES, cut at paragraph
    breaks (else line breaks), decoded incrementally."""
    with _open(source, path) as fh:
        head = fh.read(_READ_BYTES)
        decoder = codecs.getincrementaldecoder(_encoding_of(head))(errors="replace")
        pending = decoder.decode(head)
        eof = not head
        while not eof or pending:
            while not eof and len(pending) < SEGMENT_BYTES:
                block = fh.read(_READ_BYTES)
                if not block:
                    eof = True
                    pending += decoder.decode(b"", final=True)
                    break
                pending += decoder.decode(block)
            if eof:
                segment, pending = pending, ""
            else:
                cut = pending.rfind("\n\n")
                if cut <= 0:
                    cut = pending.rfind("\n")
                if cut <= 0:
                    cut = len(pending)
                segment, pending = pending[:cut], pending[cut:]
            text = clean_text(segment)
            if text:
                yield text


def chunk_segments(
    source: Source, path: str, doc_id: str, chunker: Chunker
) -> Iterator[tuple[list[ChunkSpan], str]]:
    """(chunks, title-so-far) per segment, with document-wide chunk indices and offsets."""
    markdown = path.lower().endswith(MARKDOWN_EXTENSIONS)
    headings: list[tuple[int, str]] = []
    index = 0
    base = 0
    title = ""
    for segment in iter_segments(source, path):
        if not title:
            title = first_heading(segment)
        doc = ParsedDocument(doc_id, segment, title, markdown=markdown)
        spans = chunker.split(doc, first_index=index, char_base=base, headings=headings)
        index += len(spans)
        base += len(segment) + 2  # segments are joined by a paragraph break
        if spans:
            yield spans, title


def stream_document(
    outcome: Any,
    source: Source,
    chunker: Chunker,
    max_bytes: int,
    write_segment: Callable[[Any], None],
    finish: Callable[[Any], None],
) -> None:
    """Process one long document: `write_segment(outcome)` after each segment's chunks are
    set on the outcome, `finish(outcome)` once all are written (or it failed/was unchanged).
    The outcome's status ends as 'ok', 'touch' (content unchanged) or 'failed'."""
    from tasks.errors import DocumentError

    try:
        digest, size = hash_file(source, outcome.path, max_bytes)
        outcome.content_hash, outcome.size = digest, size
        if outcome.state == "check" and digest == outcome.old_hash:
            outcome.status = "touch"
        else:
            outcome.status = "ok"
            total = 0
            for spans, title in chunk_segments(source, outcome.path, outcome.doc_id, chunker):
                outcome.chunks = spans
                outcome.parsed = ParsedDocument(outcome.doc_id, "", title)
                write_segment(outcome)
                total += len(spans)
            outcome.chunks = []
            if total == 0:
                outcome.status, outcome.error = "failed", "no text to index after chunking"
    except DocumentError as exc:
        outcome.status, outcome.error = "failed", str(exc)
        outcome.keep_chunks = isinstance(exc, ReadError)
        log.warning("skipped %s: %s", outcome.doc_id, exc)
    finish(outcome)
