"""Reading, parsing and chunking one batch of planned work: plain functions, no Prefect."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.chunking import Chunker, ChunkSpan
from tasks.errors import DocumentError, ReadError
from tasks.identity import content_hash
from tasks.parsing import ParsedDocument, parse_document, record_document
from tasks.sources import Source
from tasks.streaming import streamable

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DocOutcome:
    """What became of one planned document in this run."""

    doc_id: str
    state: str  # the plan's state: new / changed / check / retry / touch
    source: str
    size: int
    mtime: float
    content_hash: str | None = None
    #: 'ok' | 'failed' | 'touch' (content unchanged; manifest refresh only) | 'stream' (a long
    #: document, processed a segment at a time after the batch: tasks.streaming)
    status: str = "ok"
    error: str | None = None
    #: a failed read leaves the last good chunks in place (the content is unknown, not gone)
    keep_chunks: bool = False
    #: failed, but some chunks were embedded: those replace the document's old chunks
    partial: bool = False
    parsed: ParsedDocument | None = None
    chunks: list[ChunkSpan] = field(default_factory=list)
    #: where fsspec reads the file (long documents are streamed from it later)
    path: str = ""
    #: the manifest's hash before this run (a 'check' compares with it)
    old_hash: str | None = None
    #: the object's change token from the listing, recorded in the manifest
    etag: str | None = None
    #: chunks written for the document, once its chunk list is dropped (the Ray runner)
    chunk_total: int | None = None

    @property
    def chunk_count(self) -> int:
        return len(self.chunks) if self.chunk_total is None else self.chunk_total

    @property
    def title(self) -> str:
        return self.parsed.title if self.parsed else ""


def read_and_parse(
    items: Sequence[dict[str, Any]], source: Source, max_bytes: int
) -> list[DocOutcome]:
    """Read and parse a batch of planned documents; failures become outcomes, not raises.

    The batch's files are downloaded first, several at a time from a bucket (the batch is
    bounded in bytes by tasks.plan.iter_work)."""
    wanted = [
        item["path"]
        for item in items
        if item["kind"] == "file"
        and item["state"] != "touch"
        and 0 < (item["size"] or 0) <= max_bytes
        and not streamable(item["source"], item["size"] or 0)
    ]
    fetched = source.read_many(wanted, max_bytes) if wanted else {}
    out: list[DocOutcome] = []
    for item in items:
        o = DocOutcome(
            item["doc_id"],
            item["state"],
            item["source"],
            item["size"] or 0,
            item["mtime"] or 0.0,
            content_hash=item.get("content_hash"),
            path=item.get("path") or "",
            old_hash=item.get("old_hash"),
            etag=item.get("etag"),
        )
        try:
            if item["kind"] == "error":
                raise ReadError(item["error"] or "unreadable")
            if item["state"] == "touch" and item["kind"] == "file":
                # same content by the listing's token: only the manifest row is refreshed
                o.status = "touch"
            elif item["kind"] == "record":
                if item["state"] == "touch":
                    o.status = "touch"
                else:
                    o.parsed = record_document(o.doc_id, item["title"] or "", item["text"] or "")
            elif (item["size"] or 0) > max_bytes:
                # refused from the listed size, before reading a byte
                raise ReadError(
                    f"{(item['size'] or 0) / 2**20:.1f} MB, larger than max_file_mb "
                    f"({max_bytes / 2**20:g} MB): raise the limit or split the file"
                )
            elif streamable(item["source"], item["size"] or 0):
                o.status = "stream"  # read, chunked, embedded and written a segment at a time
            else:
                data = fetched.get(item["path"], b"")  # listed as empty: nothing to GET
                if isinstance(data, ReadError):
                    raise data
                o.size = len(data)
                o.content_hash = content_hash(data)
                if item["state"] == "check" and o.content_hash == item.get("old_hash"):
                    o.status = "touch"  # only the modification time changed
                else:
                    o.parsed = parse_document(o.doc_id, item["source"], data)
        except DocumentError as exc:
            o.status = "failed"
            o.error = str(exc)
            o.keep_chunks = isinstance(exc, ReadError)
            log.warning("skipped %s: %s", o.doc_id, exc)
        except Exception as exc:  # a parser library's own bug must not end the run
            o.status = "failed"
            o.error = f"{type(exc).__name__}: {exc}"
            log.warning("skipped %s: %s", o.doc_id, o.error)
        out.append(o)
    return out


def chunk_outcomes(outcomes: Sequence[DocOutcome], chunker: Chunker) -> int:
    """Chunk every parsed document in place; returns the number of chunks."""
    total = 0
    for o in outcomes:
        if o.parsed is None or o.status != "ok":
            continue
        try:
            o.chunks = chunker.split(o.parsed)
        except Exception as exc:
            o.status, o.error, o.chunks = "failed", f"chunking failed: {exc}", []
            continue
        if not o.chunks:
            o.status, o.error = "failed", "no text to index after chunking"
        total += len(o.chunks)
    return total
