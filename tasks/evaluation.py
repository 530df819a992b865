"""Labelled query sets and document-level retrieval for evaluation.

Retrieval returns chunks; judgments are about documents. A document's score is its best
chunk's score, documents keep the order of their best chunk, and enough chunks are fetched
that `depth` distinct documents are ranked.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.embedders.base import Embedder
from tasks.errors import ConfigurationError
from tasks.search import Mode, search_rows
from tasks.store import Store

log = logging.getLogger(__name__)

MAX_CHUNK_DEPTH = 5_000


@dataclass
class QuerySet:
    """Queries and their relevance judgments."""

    name: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    unknown_queries: list[str] = field(default_factory=list)
    #: where it was read from (an absolute path), part of its identity
    location: str = ""

    @property
    def key(self) -> str:
        """The dataset's identity: its location plus a hash of its judged queries and their
        judgements. Editing the labels starts a new history (the numbers are not comparable)."""
        content = json.dumps(
            {"queries": self.judged, "qrels": self.qrels}, sort_keys=True, ensure_ascii=False
        )
        h = hashlib.sha256(self.location.encode("utf-8", "surrogatepass") + b"\x00")
        h.update(content.encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:24]

    @property
    def judged(self) -> dict[str, str]:
        return {q: t for q, t in self.queries.items() if self.qrels.get(q)}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ConfigurationError(f"{path}:{n}: expected a JSON object")
            rows.append(row)
    return rows


def _load_beir(root: Path, split: str) -> QuerySet:
    qfile = root / "queries.jsonl"
    rfile = root / "qrels" / f"{split}.tsv"
    if not rfile.exists():
        raise ConfigurationError(f"{root}: no qrels/{split}.tsv (BEIR layout)")
    queries: dict[str, str] = {}
    for n, row in enumerate(_read_jsonl(qfile), start=1):
        if "_id" not in row or "text" not in row:
            raise ConfigurationError(f"{qfile}:{n}: a query needs '_id' and 'text'")
        queries[str(row["_id"])] = str(row["text"])
    qrels: dict[str, dict[str, int]] = {}
    unknown: list[str] = []
    with open(rfile, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise ConfigurationError(f"{rfile}: empty qrels file")
        for n, line in enumerate(reader, start=2):
            if not line or not "".join(line).strip():
                continue
            if len(line) < 3:
                raise ConfigurationError(
                    f"{rfile}:{n}: expected query-id, corpus-id, score separated by tabs"
                )
            try:
                grade = int(float(line[2]))
            except ValueError as exc:
                raise ConfigurationError(f"{rfile}:{n}: score {line[2]!r} is not a number") from exc
            qid, did = line[0].strip(), line[1].strip()
            if qid not in queries:
                unknown.append(qid)
                continue
            qrels.setdefault(qid, {})[did] = grade
    return QuerySet(root.name, queries, qrels, sorted(set(unknown)))


def _load_simple(path: Path) -> QuerySet:
    """JSONL or CSV rows of `query` and relevant document ids (`relevant`, a list or a
    '|'-separated string; or one `doc_id` per row), optionally `id` and `grade`."""
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            rows: list[dict] = list(csv.DictReader(fh))
        start = 2
    else:
        rows = _read_jsonl(path)
        start = 1
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    by_text: dict[str, str] = {}
    for n, row in enumerate(rows, start=start):
        text = row.get("query")
        if not isinstance(text, str) or not text.strip():
            raise ConfigurationError(f"{path}:{n}: no 'query'")
        rel = row.get("relevant", row.get("doc_id", row.get("relevant_ids")))
        if rel is None or rel == "" or rel == []:
            raise ConfigurationError(f"{path}:{n}: no relevant document ids ('relevant')")
        ids = [str(x) for x in rel] if isinstance(rel, list) else str(rel).split("|")
        qid = str(row.get("id") or by_text.get(text) or f"q{n}")
        by_text.setdefault(text, qid)
        queries[qid] = text
        grade = int(float(row.get("grade") or 1))
        for did in ids:
            if did.strip():
                qrels.setdefault(qid, {})[did.strip()] = grade
    return QuerySet(path.stem, queries, qrels)


def load_query_set(location: str, split: str = "test") -> QuerySet:
    """A BEIR folder (queries.jsonl + qrels/SPLIT.tsv) or a JSONL/CSV file of queries."""
    path = Path(location).expanduser()
    if path.is_dir():
        qs = _load_beir(path, split)
        qs.location = f"{os.path.realpath(path)}#{split}"
        return qs
    if not path.exists():
        raise ConfigurationError(f"query set {location!r} does not exist")
    qs = _load_simple(path)
    qs.location = os.path.realpath(path)
    return qs


def retrieve_documents(
    store: Store,
    queries: Sequence[str],
    mode: Mode,
    depth: int,
    embedder: Embedder | None = None,
) -> list[list[tuple[str, float]]]:
    """The top `depth` documents per query, by their best chunk (same search path as the CLI)."""
    n = max(depth * 3, 30)
    pending = list(range(len(queries)))
    out: list[list[tuple[str, float]]] = [[] for _ in queries]
    while pending:
        rows = search_rows(store, [queries[i] for i in pending], mode, n, embedder)
        retry = []
        for i, hits in zip(pending, rows, strict=True):
            best: dict[str, float] = {}
            for h in hits:
                best.setdefault(h["doc_id"], float(h["_score"]))  # hits are ranked
            out[i] = list(best.items())[:depth]
            if len(best) < depth and len(hits) >= n and n < MAX_CHUNK_DEPTH:
                retry.append(i)
        pending = retry
        n = min(n * 2, MAX_CHUNK_DEPTH)
    return out
