"""The LanceDB side: table schemas (declared once), writes, deletes, indexes and upkeep.

Tables in one database directory:
    chunks     one row per chunk, with its vector; records the model that made it
    documents  the manifest: one row per document, its content hash and status
    runs       one row per ingest run: the run report
    evaluations  one row per evaluation run and retrieval mode: the metric history
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.errors import ModelMismatchError, TableError

log = logging.getLogger(__name__)

CHUNKS = "chunks"
DOCUMENTS = "documents"
RUNS = "runs"
EVALUATIONS = "evaluations"

META_MODEL = b"lanceflow.model"
META_DIM = b"lanceflow.dimension"
META_EMBEDDER = b"lanceflow.embedder"

_CJK = re.compile(
    r"[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+"
)


def chunks_schema(dimension: int, model_id: str, embedder: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            # CJK runs of the text only: indexed with a character n-gram tokenizer, since
            # Korean/Chinese/Japanese words are not separated by spaces the way English are
            pa.field("text_cjk", pa.string(), nullable=False),
            pa.field("text_hash", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dimension), nullable=False),
            pa.field("title", pa.string()),
            pa.field("heading", pa.string()),
            pa.field("source", pa.string()),
            pa.field("char_start", pa.int32()),
            pa.field("char_end", pa.int32()),
            pa.field("page_start", pa.int32()),
            pa.field("page_end", pa.int32()),
        ],
        metadata={
            META_MODEL: model_id.encode(),
            META_DIM: str(dimension).encode(),
            META_EMBEDDER: embedder.encode(),
        },
    )


DOCUMENTS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("content_hash", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime", pa.float64()),
        pa.field("chunk_count", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # 'ok' | 'failed'
        pa.field("error", pa.string()),
        pa.field("title", pa.string()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("flow_run_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("model", pa.string()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("seconds", pa.float64()),
        pa.field("status", pa.string()),
        pa.field("documents_seen", pa.int64()),
        pa.field("documents_failed", pa.int64()),
        pa.field("chunks_embedded", pa.int64()),
        pa.field("chunks_written", pa.int64()),
        pa.field("table_version", pa.int64()),
        pa.field("report", pa.string()),
    ]
)


EVALUATIONS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("flow_run_id", pa.string()),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("table_version", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("queries", pa.int64()),
        pa.field("ndcg_at_10", pa.float64()),
        pa.field("metrics", pa.string()),  # JSON: every metric of the run
        pa.field("evaluated_at", pa.timestamp("us", tz="UTC")),
    ]
)


def cjk_text(text: str) -> str:
    """The CJK runs of a text, space-separated ('' when there are none)."""
    return " ".join(_CJK.findall(text))


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sql_in(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(sql_str(v) for v in values)})"


@dataclass(frozen=True, slots=True)
class TableModel:
    model_id: str
    dimension: int
    embedder: str


class Store:
    """One LanceDB database directory with lanceflow's tables."""

    def __init__(self, uri: str) -> None:
        import lancedb

        self.uri = uri
        try:
            # strong consistency: every read sees the latest commit, from any writer
            self.db = lancedb.connect(uri, read_consistency_interval=timedelta(0))
        except Exception as exc:
            raise TableError(f"cannot open LanceDB at {uri!r}: {exc}") from exc
        self._tables: dict[str, Any] = {}

    # ---- tables ------------------------------------------------------------------------

    def names(self) -> set[str]:
        return set(self.db.list_tables().tables)

    def has(self, name: str) -> bool:
        return name in self._tables or name in self.names()

    def table(self, name: str) -> Any:
        tbl = self._tables.get(name)
        if tbl is None:
            tbl = self.db.open_table(name)
            self._tables[name] = tbl
        return tbl

    def _ensure(self, name: str, schema: pa.Schema) -> Any:
        if name in self._tables:
            return self._tables[name]
        if name in self.names():
            return self.table(name)
        tbl = self.db.create_table(name, schema=schema, exist_ok=True)
        self._tables[name] = tbl
        return tbl

    def documents(self) -> Any:
        return self._ensure(DOCUMENTS, DOCUMENTS_SCHEMA)

    def runs(self) -> Any:
        return self._ensure(RUNS, RUNS_SCHEMA)

    def chunks(self, model: TableModel | None = None) -> Any:
        if self.has(CHUNKS):
            return self.table(CHUNKS)
        if model is None:
            raise TableError(
                f"no chunks table in {self.uri!r}: run `lanceflow ingest SOURCE --table "
                f"{self.uri}` first"
            )
        return self._ensure(CHUNKS, chunks_schema(model.dimension, model.model_id, model.embedder))

    def table_model(self) -> TableModel | None:
        """The model recorded in the chunks table, or None when there is no table yet."""
        if not self.has(CHUNKS):
            return None
        meta = self.table(CHUNKS).schema.metadata or {}
        try:
            return TableModel(
                meta[META_MODEL].decode(), int(meta[META_DIM]), meta[META_EMBEDDER].decode()
            )
        except KeyError as exc:
            raise TableError(
                f"the chunks table in {self.uri!r} was not written by lanceflow (no model "
                "recorded); use another --table"
            ) from exc

    def check_model(self, model_id: str, embedder: str, dimension: int | None = None) -> None:
        """Refuse to mix models or dimensions in one table."""
        recorded = self.table_model()
        if recorded is None:
            return
        if recorded.model_id != model_id or recorded.embedder != embedder:
            raise ModelMismatchError(
                f"the table at {self.uri!r} was embedded with {recorded.embedder} model "
                f"{recorded.model_id!r} (dimension {recorded.dimension}); you asked for "
                f"{embedder} model {model_id!r}. Vectors of two models cannot share a table: "
                f"pass --model {recorded.model_id!r}, or write to a new --table (or delete "
                "this one to rebuild it)."
            )
        if dimension is not None and recorded.dimension != dimension:
            raise ModelMismatchError(
                f"the table at {self.uri!r} holds {recorded.dimension}-dimensional vectors; "
                f"the model now gives {dimension}. Write to a new --table."
            )

    def version(self) -> int:
        return int(self.table(CHUNKS).version) if self.has(CHUNKS) else 0

    # ---- manifest ----------------------------------------------------------------------

    def load_manifest(self) -> dict[str, tuple[str | None, int, float, str, str]]:
        """doc_id -> (content_hash, size, mtime, status, source)."""
        if not self.has(DOCUMENTS):
            return {}
        tbl = self.table(DOCUMENTS)
        data = (
            tbl.search()
            .select(["doc_id", "content_hash", "size", "mtime", "status", "source"])
            .limit(None)
            .to_arrow()
        )
        cols = [data.column(c).to_pylist() for c in data.column_names]
        return {
            row[0]: (row[1], row[2] or 0, row[3] or 0.0, row[4], row[5])
            for row in zip(*cols, strict=True)
        }

    def upsert_documents(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        now = datetime.now(UTC)
        for r in rows:
            r.setdefault("updated_at", now)
        data = pa.Table.from_pylist(rows, schema=DOCUMENTS_SCHEMA)
        (
            self.documents()
            .merge_insert("doc_id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(data)
        )

    def delete_documents(self, doc_ids: Sequence[str], batch: int = 500) -> None:
        """Remove documents and all their chunks (chunks first, so a crash converges)."""
        for i in range(0, len(doc_ids), batch):
            part = doc_ids[i : i + batch]
            if self.has(CHUNKS):
                self.table(CHUNKS).delete(sql_in("doc_id", part))
            self.documents().delete(sql_in("doc_id", part))

    # ---- chunks ------------------------------------------------------------------------

    def cached_vectors(self, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors already in the table for these chunk-text hashes (the embedding cache)."""
        if not hashes or not self.has(CHUNKS):
            return {}
        tbl = self.table(CHUNKS)
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(hashes))
        for i in range(0, len(unique), 1000):
            part = unique[i : i + 1000]
            data = (
                tbl.search()
                .where(sql_in("text_hash", part))
                .select(["text_hash", "vector"])
                .limit(None)
                .to_arrow()
            )
            if data.num_rows == 0:
                continue
            keys = data.column("text_hash").to_pylist()
            vecs = data.column("vector").combine_chunks()
            dim = vecs.type.list_size
            flat = vecs.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
            for k, v in zip(keys, flat, strict=True):
                found.setdefault(k, v)
        return found

    def replace_chunks(self, rows: pa.Table, replace_doc_ids: Sequence[str]) -> None:
        """Upsert chunks on chunk_id and drop the other chunks of the given documents, in one
        commit: a document's old chunks never coexist with its new ones."""
        tbl = self.chunks()
        if rows.num_rows == 0:
            if replace_doc_ids:
                tbl.delete(sql_in("doc_id", replace_doc_ids))
            return
        builder = (
            tbl.merge_insert("chunk_id").when_matched_update_all().when_not_matched_insert_all()
        )
        if replace_doc_ids:
            builder = builder.when_not_matched_by_source_delete(sql_in("doc_id", replace_doc_ids))
        builder.execute(rows)

    # ---- runs --------------------------------------------------------------------------

    def record_run(self, row: dict[str, Any]) -> None:
        self.runs().add(pa.Table.from_pylist([row], schema=RUNS_SCHEMA))

    def record_evaluations(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            tbl = self._ensure(EVALUATIONS, EVALUATIONS_SCHEMA)
            tbl.add(pa.Table.from_pylist(rows, schema=EVALUATIONS_SCHEMA))

    def evaluation_history(self, dataset: str) -> list[dict[str, Any]]:
        """Earlier evaluations of a dataset, oldest first."""
        if not self.has(EVALUATIONS):
            return []
        rows = (
            self.table(EVALUATIONS)
            .search()
            .where(f"dataset = {sql_str(dataset)}")
            .limit(None)
            .to_arrow()
            .to_pylist()
        )
        rows.sort(key=lambda r: r["evaluated_at"])
        return rows

    def document_ids(self) -> set[str]:
        """Ids of the documents indexed (status ok)."""
        if not self.has(DOCUMENTS):
            return set()
        data = (
            self.table(DOCUMENTS)
            .search()
            .where("status = 'ok'")
            .select(["doc_id"])
            .limit(None)
            .to_arrow()
        )
        return set(data.column("doc_id").to_pylist())

    # ---- indexes and upkeep ------------------------------------------------------------

    def index_names(self) -> set[str]:
        if not self.has(CHUNKS):
            return set()
        return {ix.name for ix in self.table(CHUNKS).list_indices()}

    def indexes_current(self) -> bool:
        names = self.index_names()
        return {"text_idx", "text_cjk_idx"} <= names

    def refresh_indexes(
        self, vector_index_min_rows: int, cleanup_older_than: timedelta | None, changed: bool
    ) -> dict[str, Any]:
        """Create missing indexes, fold new rows into existing ones, compact and prune."""
        if not self.has(CHUNKS):
            return {"indexes": []}
        tbl = self.table(CHUNKS)
        names = self.index_names()
        created: list[str] = []
        rows = tbl.count_rows()
        if "text_idx" not in names:
            tbl.create_fts_index(
                "text",
                replace=True,
                language="English",
                stem=True,
                remove_stop_words=True,
                lower_case=True,
                ascii_folding=True,
            )
            created.append("text_idx")
        if "text_cjk_idx" not in names:
            tbl.create_fts_index(
                "text_cjk",
                replace=True,
                base_tokenizer="ngram",
                ngram_min_length=2,
                ngram_max_length=2,
                prefix_only=False,
                lower_case=True,
                stem=False,
                remove_stop_words=False,
                ascii_folding=False,
            )
            created.append("text_cjk_idx")
        for column in ("chunk_id", "doc_id", "text_hash"):
            if f"{column}_idx" not in names and rows:
                tbl.create_scalar_index(column, index_type="BTREE", replace=True)
                created.append(f"{column}_idx")
        if "vector_idx" not in names and rows >= vector_index_min_rows:
            tbl.create_index(metric="cosine", vector_column_name="vector", replace=True)
            created.append("vector_idx")
        if changed:
            # compaction, folding new rows into the indexes, pruning old versions
            tbl.optimize(cleanup_older_than=cleanup_older_than)
        return {"indexes": sorted(self.index_names()), "created": created, "rows": rows}


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])


def report_json(report: Any) -> str:
    return json.dumps(report, default=str, ensure_ascii=False)
