"""Deterministic identity: hashes of content and ids of chunks.

A re-run, a crash-and-retry or a second worker compute the same ids for the same input, so
writes can upsert on them.
"""

from __future__ import annotations

import hashlib


def content_hash(data: bytes) -> str:
    """The hash of a document's raw bytes (hex SHA-256)."""
    return hashlib.sha256(data).hexdigest()


def record_hash(title: str, text: str) -> str:
    """The hash of a record document (title and text)."""
    h = hashlib.sha256()
    h.update(title.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def text_hash(text: str) -> str:
    """The hash of one chunk's text: the embedding cache key (with the model)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def doc_key(source_uri: str, doc_id: str) -> str:
    """A document's key in a table that indexes several sources: (source, document id)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(source_uri.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(doc_id.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def chunk_id(document_key: str, index: int, chunk_text_hash: str) -> str:
    """A chunk's id: derived from its document (see doc_key), position and text."""
    h = hashlib.blake2b(digest_size=16)
    h.update(document_key.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(str(index).encode())
    h.update(b"\x00")
    h.update(chunk_text_hash.encode())
    return h.hexdigest()
