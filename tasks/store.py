"""The LanceDB side: table schemas (declared once), writes, deletes, indexes and upkeep.

Tables in one database directory:
    chunks       one row per chunk, with its vector; records the model that made it
    documents    the manifest: one row per (source, document), its content hash and status
    generations  which chunks/documents pair is live, which is being built (tasks.generations)
    runs         one row per ingest run: the run report
    evaluations  one row per evaluation run and retrieval mode: the metric history

`chunks` and `documents` exist once per index generation (`chunks_g2`, ... after a reindex).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa

from tasks.crashpoints import crash_point
from tasks.errors import ConfigurationError, ModelMismatchError, TableError
from tasks.generations import GENERATIONS, Generation, list_generations
from tasks.generations import live as live_generation
from tasks.memory import READ_CACHE_MB, WRITE_CACHE_MB, bound_lance_io_buffer, release_free_heap

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
            # hash of (source_uri, doc_id): one document of one source
            pa.field("doc_key", pa.string(), nullable=False),
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("source_uri", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            # CJK runs of the text only: indexed with a character n-gram tokenizer, since
            # Korean/Chinese/Japanese words are not separated by spaces the way English are
            pa.field("text_cjk", pa.string(), nullable=False),
            pa.field("text_hash", pa.string(), nullable=False),
            # the content hash of the document version the chunk belongs to
            pa.field("doc_version", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dimension), nullable=False),
            pa.field("title", pa.string()),
            pa.field("heading", pa.string()),
            pa.field("path", pa.string()),  # the file within the source it came from
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
        pa.field("doc_key", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("content_hash", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime", pa.float64()),
        pa.field("chunk_count", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # DocStatus
        pa.field("error", pa.string()),
        pa.field("title", pa.string()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
        # the listing's change token (an ETag, content MD5 or version id) of a bucket object:
        # equal token and size mean the object is not downloaded (tasks.sources.change_token)
        pa.field("etag", pa.string()),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("flow_run_id", pa.string()),
        pa.field("source", pa.string()),  # the canonical source URI
        pa.field("model", pa.string()),
        pa.field("generation", pa.int64()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("seconds", pa.float64()),
        pa.field("status", pa.string()),
        pa.field("documents_seen", pa.int64()),
        pa.field("documents_failed", pa.int64()),
        pa.field("chunks_embedded", pa.int64()),
        pa.field("chunks_written", pa.int64()),
        pa.field("table_version", pa.int64()),
        pa.field("report", pa.string()),
        # the version tag this run left on the chunks and documents tables (tasks.versions)
        pa.field("tag", pa.string()),
    ]
)


EVALUATIONS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("flow_run_id", pa.string()),
        pa.field("dataset", pa.string(), nullable=False),
        # the dataset's identity: its location and a hash of its queries and judgements
        pa.field("dataset_key", pa.string()),
        pa.field("location", pa.string()),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("generation", pa.int64()),
        pa.field("table_version", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("queries", pa.int64()),
        pa.field("ndcg_at_10", pa.float64()),
        pa.field("metrics", pa.string()),  # JSON: every metric of the run
        pa.field("passed", pa.bool_()),  # whether the run passed its gate
        pa.field("accepted", pa.bool_()),  # pinned as the baseline by an operator (--accept)
        pa.field("gate", pa.string()),  # JSON: the gate settings the run was judged with
        pa.field("evaluated_at", pa.timestamp("us", tz="UTC")),
        pa.field("tag", pa.string()),  # the version tag of the scored version, if any
    ]
)


class ManifestRow(NamedTuple):
    """One document of the manifest, as change detection needs it."""

    content_hash: str | None
    size: int
    mtime: float
    status: str
    path: str
    etag: str | None = None


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


#: tables that get compaction and old-version cleanup besides the generation's own
_UPKEEP_TABLES = (RUNS, EVALUATIONS, GENERATIONS, "version_tags", "maintenance")

#: the columns a run looks rows up by (B-tree indexes, kept current while it writes)
CHUNK_KEYS = ("chunk_id", "doc_key", "text_hash")
DOCUMENT_KEYS = ("doc_key",)
#: a key index is rebuilt during a run once the rows written since it was built pass this many
#: rows or this share of the table, whichever is larger. A lookup reads the index for the rows
#: it covers and scans the rest, so without a rebuild every batch of a large first run would
#: scan all the rows the run wrote before it. With it, a batch scans at most that many rows;
#: the share keeps the rebuilds' own cost (each one reads the whole key column) in proportion
#: on large tables (measured: 3 B-trees over 217k rows in 0.5 s; one batch's lookups scanning
#: 430k unindexed rows 1.6 s).
KEY_INDEX_STALE_ROWS = 50_000
KEY_INDEX_STALE_SHARE = 0.05


#: one LanceDB session per cache size: a process that writes (an ingest) and reads (search,
#: evaluation) holds at most one of each
_SESSIONS: dict[int, Any] = {}
_SESSIONS_LOCK = threading.Lock()


def cache_bytes(default_mb: float = READ_CACHE_MB) -> int:
    """Each of Lance's index and metadata caches: LANCEFLOW_LANCE_CACHE_MB when set (for
    every session of the process), else `default_mb` (tasks.memory: READ_CACHE_MB for search
    and evaluation, WRITE_CACHE_MB for an ingest run)."""
    import math
    import os

    raw = os.environ.get("LANCEFLOW_LANCE_CACHE_MB", "").strip()
    try:
        mb = float(raw) if raw else float(default_mb)
    except ValueError:
        mb = math.nan
    if not math.isfinite(mb) or mb < 0:
        raise ConfigurationError(
            f"LANCEFLOW_LANCE_CACHE_MB={raw!r}: expected a number of MiB (0 or more) for each "
            "of Lance's caches; unset it for lanceflow's defaults"
        )
    return int(mb * 2**20)


def _session(size: int) -> Any:
    """The process's LanceDB session whose index and metadata caches hold `size` bytes each."""
    with _SESSIONS_LOCK:  # two threads opening their first store at once share one
        session = _SESSIONS.get(size)
        if session is None:
            import lancedb

            bound_lance_io_buffer()  # before the first scan reads it (tasks.memory)
            session = lancedb.Session(index_cache_size_bytes=size, metadata_cache_size_bytes=size)
            _SESSIONS[size] = session
        return session


def open_lance(
    uri: str,
    storage_options: dict[str, str] | None = None,
    version: int | None = None,
    cache_size: int | None = None,
) -> Any:
    """A pylance handle on a table's dataset with the cache bounds of an ingest run's
    connection (pylance's own handles otherwise get Lance's default caches)."""
    import lance

    size = cache_size if cache_size is not None else cache_bytes(WRITE_CACHE_MB)
    return lance.dataset(
        uri,
        version=version,
        storage_options=storage_options or None,
        index_cache_size_bytes=size,
        metadata_cache_size_bytes=size,
    )


def write_uri(db_uri: str, table_uri: str) -> str:
    """The URI that Lance writes and commits to for a table of the database at `db_uri`, given
    the table's dataset URI as lancedb reports it. lancedb drops an `s3+ddb://` database's
    scheme and query from it (fine for reading); a commit through it would bypass the
    DynamoDB commit store, so the scheme and `?ddbTableName=` are put back."""
    db = urlparse(db_uri)
    if db.scheme != "s3+ddb":
        return table_uri
    table = urlparse(table_uri)
    return table._replace(scheme=db.scheme, query=db.query).geturl()


def lance_of(tbl: Any, cache_size: int, db_uri: str = "") -> Any:
    """The pylance dataset behind a lancedb table, with these cache bounds (lancedb's
    `to_lance()` gives it Lance's default caches, not the connection's). For a commit, give
    the database's `db_uri`: an `s3+ddb://` table's dataset is then opened through its
    DynamoDB commit store, which lancedb's `to_lance()` drops (a compaction through that
    handle committed beside the store, and the next commit through DynamoDB failed: 'This
    CreateIndex transaction was preempted by concurrent transaction Rewrite')."""
    from tasks.storage import is_ddb

    if is_ddb(db_uri):
        # the table's path as lancedb holds it: no dataset opened only to read its URI
        uri = write_uri(db_uri, tbl._dataset_path)
        return open_lance(uri, tbl._conn.storage_options, tbl.version, cache_size)
    return tbl.to_lance(index_cache_size_bytes=cache_size, metadata_cache_size_bytes=cache_size)


class Store:
    """One LanceDB database with lanceflow's tables, bound to one index generation.

    `Store(uri)` reads the live generation (what search and evaluation use); `store.at(gen)`
    gives a view of another generation over the same connection (a `--reindex` builds one).
    `cache_mb` bounds each of Lance's index and metadata caches of the connection (an ingest
    run opens it with tasks.memory.WRITE_CACHE_MB; LANCEFLOW_LANCE_CACHE_MB overrides both).
    """

    def __init__(
        self,
        uri: str,
        *,
        storage_options: dict[str, str] | None = None,
        cache_mb: float = READ_CACHE_MB,
        _db: Any = None,
        _generation: Generation | None = None,
        _cache_size: int | None = None,
    ) -> None:
        self.uri = uri
        #: bytes in each of Lance's caches for this connection (`cache_bytes`); a view over
        #: another Store's connection is given that connection's
        self.cache_size = _cache_size if _cache_size is not None else cache_bytes(cache_mb)
        if _db is None:
            import lancedb

            from tasks.storage import redact_text, redact_uri

            try:
                # strong consistency: every read sees the latest commit, from any writer;
                # bounded caches, so a long run's memory does not grow with the table
                _db = lancedb.connect(
                    uri,
                    read_consistency_interval=timedelta(0),
                    session=_session(self.cache_size),
                    storage_options=storage_options or None,
                )
            except Exception as exc:
                raise TableError(
                    f"cannot open LanceDB at {redact_uri(uri)!r}: "
                    + redact_text(str(exc), storage_options)
                ) from None
            from tasks.storage import check_commit_store

            check_commit_store(uri, storage_options)  # s3+ddb: before anything is written
        self.db = _db
        self._generation = _generation
        self._bound = _generation is not None
        self._tables: dict[str, Any] = {}
        #: per table: rows written since its key indexes were built
        self._unindexed: dict[str, int] = {}

    def at(self, generation: Generation) -> Store:
        """A view of `generation` sharing this connection."""
        return Store(self.uri, _db=self.db, _generation=generation, _cache_size=self.cache_size)

    # ---- generations ---------------------------------------------------------------------

    def generations(self) -> list[Generation]:
        return list_generations(self.db)

    @property
    def generation(self) -> Generation | None:
        """The generation this view reads: the one it was bound to, else the live one (None
        for an empty database, or a table written before generations existed)."""
        if not self._bound:
            self._generation = live_generation(self.generations())
            self._bound = True
        return self._generation

    @property
    def generation_number(self) -> int:
        gen = self.generation
        return gen.number if gen is not None else (1 if self.has(CHUNKS) else 0)

    @property
    def chunks_name(self) -> str:
        gen = self.generation
        return gen.chunks_table if gen is not None else CHUNKS

    @property
    def documents_name(self) -> str:
        gen = self.generation
        return gen.documents_table if gen is not None else DOCUMENTS

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
            tbl = self.table(name)
            _add_missing_columns(tbl, schema)
            return tbl
        tbl = self.db.create_table(name, schema=schema, exist_ok=True)
        self._tables[name] = tbl
        return tbl

    def has_chunks(self) -> bool:
        return self.has(self.chunks_name)

    def chunks_table(self) -> Any:
        """The generation's chunks table (TableError when there is none yet)."""
        if not self.has_chunks():
            raise TableError(
                f"no chunks table in {self.uri!r}: run `lanceflow ingest SOURCE --table "
                f"{self.uri}` first"
            )
        return self.table(self.chunks_name)

    def documents(self) -> Any:
        return self._ensure(self.documents_name, DOCUMENTS_SCHEMA)

    def runs(self) -> Any:
        return self._ensure(RUNS, RUNS_SCHEMA)

    def chunks(self, model: TableModel | None = None) -> Any:
        if self.has_chunks() or model is None:
            return self.chunks_table()
        schema = chunks_schema(model.dimension, model.model_id, model.embedder)
        return self._ensure(self.chunks_name, schema)

    def table_model(self) -> TableModel | None:
        """The model recorded in the chunks table, or None when there is no table yet."""
        if not self.has_chunks():
            return None
        meta = self.table(self.chunks_name).schema.metadata or {}
        try:
            return TableModel(
                meta[META_MODEL].decode(), int(meta[META_DIM]), meta[META_EMBEDDER].decode()
            )
        except KeyError as exc:
            raise TableError(
                f"the chunks table in {self.uri!r} was not written by lanceflow (no model "
                "recorded); use another --table"
            ) from exc

    def check_dimension(self, model_id: str, dimension: int) -> None:
        recorded = self.table_model()
        if recorded is not None and recorded.dimension != dimension:
            raise ModelMismatchError(
                f"the table at {self.uri!r} holds {recorded.dimension}-dimensional vectors; "
                f"{model_id} now gives {dimension}. Rebuild with --reindex, or write to a new "
                "--table."
            )

    def version(self) -> int:
        return int(self.table(self.chunks_name).version) if self.has_chunks() else 0

    # ---- manifest ----------------------------------------------------------------------

    def load_manifest(self, source_uri: str) -> dict[str, ManifestRow]:
        """doc_id -> its manifest row, for the documents of one source."""
        if not self.has(self.documents_name):
            return {}
        tbl = self.table(self.documents_name)
        if "source_uri" not in tbl.schema.names:
            # written by a lanceflow before several sources per table: one source, 'source'
            # held the path
            query = tbl.search().select(["doc_id", "content_hash", "size", "mtime", "status"])
            data = query.limit(None).to_arrow()
            data = data.append_column("path", data.column("doc_id"))
        else:
            columns = ["doc_id", "content_hash", "size", "mtime", "status", "path"]
            data = (
                tbl.search()
                .where(f"source_uri = {sql_str(source_uri)}")
                .select(columns + (["etag"] if "etag" in tbl.schema.names else []))
                .limit(None)
                .to_arrow()
            )
        cols = [data.column(c).to_pylist() for c in data.column_names]
        if "etag" not in data.column_names:
            cols.append([None] * data.num_rows)
        return {
            row[0]: ManifestRow(row[1], row[2] or 0, row[3] or 0.0, row[4], row[5], row[6])
            for row in zip(*cols, strict=True)
        }

    def sources(self) -> list[str]:
        """The source URIs with documents in this generation."""
        if not self.has(self.documents_name):
            return []
        tbl = self.table(self.documents_name)
        if "source_uri" not in tbl.schema.names:
            return []  # an older lanceflow's table: its one source was not recorded
        data = tbl.search().select(["source_uri"]).limit(None).to_arrow()
        return sorted(set(data.column("source_uri").to_pylist()))

    def upsert_documents(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        now = datetime.now(UTC)
        for r in rows:
            r.setdefault("updated_at", now)
        data = pa.Table.from_pylist(rows, schema=DOCUMENTS_SCHEMA)
        (
            self.documents()
            .merge_insert("doc_key")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(data)
        )
        self._keep_key_indexes(self.documents_name, DOCUMENT_KEYS, data.num_rows)

    def delete_documents(self, doc_keys: Sequence[str], batch: int = 500) -> None:
        """Remove documents and all their chunks (chunks first, so a crash converges)."""
        for i in range(0, len(doc_keys), batch):
            part = doc_keys[i : i + batch]
            if self.has_chunks():
                self.table(self.chunks_name).delete(sql_in("doc_key", part))
            crash_point("during-deletions")
            self.documents().delete(sql_in("doc_key", part))

    def remove_unowned_chunks(self, batch: int = 500) -> tuple[int, int]:
        """Chunks that no manifest row owns, removed: (chunks, documents).

        A run killed after committing chunks and before writing their documents' manifest
        rows leaves such chunks (tasks.commits). The next run re-embeds those documents and
        replaces them, but a document deleted from the source, or now failing, before that
        run has no manifest row to be deleted or replaced by: its chunks would answer
        searches for ever. Every manifest row counts the chunks it owns (`chunk_count`), so
        the table holds exactly their sum; only when it does not (one `count_rows` and a
        scan of the manifest's counts) are the chunks' document keys read, a column at a
        time, and those of documents without a row that owns chunks deleted."""
        import pyarrow.compute as pc

        if not self.has_chunks():
            return 0, 0
        tbl = self.table(self.chunks_name)
        total = int(tbl.count_rows())
        has_docs = self.has(self.documents_name)

        def owners(columns: list[str]) -> pa.Table:
            query = self.documents().search().where("chunk_count > 0").select(columns)
            return query.limit(None).to_arrow()

        expected = int(pc.sum(owners(["chunk_count"]).column(0)).as_py() or 0) if has_docs else 0
        if total == expected:
            return 0, 0
        owned = set(owners(["doc_key"]).column(0).to_pylist()) if has_docs else set()
        keys: set[str] = set()
        scanner = lance_of(tbl, self.cache_size).scanner(columns=["doc_key"], batch_size=65536)
        for part in scanner.to_batches():
            keys.update(k for k in pc.unique(part.column(0)).to_pylist() if k not in owned)
        if not keys:
            log.warning(
                "the chunks table has %d rows, its manifest counts %d, and every chunk's "
                "document owns chunks: nothing removed",
                total,
                expected,
            )
            return 0, 0
        stale = sorted(keys)
        removed = 0
        for i in range(0, len(stale), batch):
            where = sql_in("doc_key", stale[i : i + batch])
            removed += int(tbl.count_rows(where))
            tbl.delete(where)
        return removed, len(stale)

    def document_rows(self, doc_keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not doc_keys or not self.has(self.documents_name):
            return {}
        data = self.documents().search().where(sql_in("doc_key", doc_keys)).limit(None).to_arrow()
        return {r["doc_key"]: r for r in data.to_pylist()}

    # ---- chunks ------------------------------------------------------------------------

    def cached_vectors(
        self, hashes: Sequence[str], also: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Vectors already stored for these chunk-text hashes: the embedding cache. Looks in
        this generation's chunks and in `also`, chunks tables of other generations with the
        same embedding fingerprint (never another embedding space).

        The hashes are looked up in sorted order, a thousand at a time: each query then reads
        only its own key range of the text_hash index. In arrival order, every query touched
        every index page, and once the index outgrew an ingest's 16 MiB index cache each one
        read them all again (1.46 M rows, 4,000 new hashes: 0.43-0.48 s unsorted, 0.125 s
        sorted)."""
        unique = sorted(set(hashes))
        found: dict[str, np.ndarray] = {}
        for name in (self.chunks_name, *also):
            if not unique or not self.has(name):
                continue
            tbl = self.table(name)
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
            unique = [h for h in unique if h not in found]
        return found

    def chunk_ids_of(self, doc_keys: Sequence[str]) -> set[str]:
        if not doc_keys or not self.has_chunks():
            return set()
        data = (
            self.table(self.chunks_name)
            .search()
            .where(sql_in("doc_key", doc_keys))
            .select(["chunk_id"])
            .limit(None)
            .to_arrow()
        )
        return set(data.column("chunk_id").to_pylist())

    def replace_chunks(
        self, rows: pa.Table, replace_doc_keys: Sequence[str], stored: set[str] | None = None
    ) -> None:
        """Upsert chunks on chunk_id and drop the other chunks of the given documents, in one
        commit: a document's old chunks never coexist with its new ones.

        `stored`: the chunk ids these documents have in the table now (chunk_ids_of), when the
        caller looked. None stored (new documents: all of a first run) makes it a plain append,
        the same result without the upsert's join, whose time and memory grow with the table
        (benchmarks/write_memory.py). A chunk id names its document, so no other document's
        row can match."""
        tbl = self.chunks()
        if stored is not None and not stored and rows.num_rows:
            self.append_chunks(rows)
            return
        if rows.num_rows == 0:
            if replace_doc_keys:
                tbl.delete(sql_in("doc_key", replace_doc_keys))
            return
        builder = (
            tbl.merge_insert("chunk_id").when_matched_update_all().when_not_matched_insert_all()
        )
        if replace_doc_keys:
            builder = builder.when_not_matched_by_source_delete(sql_in("doc_key", replace_doc_keys))
        builder.execute(rows)
        self._keep_key_indexes(self.chunks_name, CHUNK_KEYS, rows.num_rows)

    def append_chunks(self, rows: pa.Table) -> None:
        """Append a long document's segment (its version's rows were cleared first, see
        delete_version: a plain append, whose memory does not grow with the table)."""
        if rows.num_rows:
            tbl = self.chunks()
            tbl.add(rows)
            self._keep_key_indexes(self.chunks_name, CHUNK_KEYS, rows.num_rows)

    def delete_version(self, doc_key: str, version: str) -> None:
        """Drop a document's rows of one version (left by an interrupted attempt)."""
        if self.has_chunks():
            self.table(self.chunks_name).delete(
                f"doc_key = {sql_str(doc_key)} AND doc_version = {sql_str(version)}"
            )

    def delete_other_versions(self, doc_key: str, version: str) -> int:
        """Drop a document's chunks that belong to any version but `version`."""
        if not self.has_chunks():
            return 0
        where = f"doc_key = {sql_str(doc_key)} AND (doc_version IS NULL OR doc_version != " + (
            f"{sql_str(version)})"
        )
        tbl = self.table(self.chunks_name)
        stale = int(tbl.count_rows(where))
        if stale:
            tbl.delete(where)
        return stale

    def keep_chunk_key_indexes(self, written: int) -> None:
        """After `written` chunk rows were committed outside replace_chunks (tasks.commits)."""
        self._keep_key_indexes(self.chunks_name, CHUNK_KEYS, written)

    def _keep_key_indexes(self, name: str, columns: Sequence[str], written: int) -> None:
        """B-tree indexes on a table's lookup keys as soon as it has rows, rebuilt while a run
        writes once the rows they do not cover pass KEY_INDEX_STALE_ROWS or
        KEY_INDEX_STALE_SHARE of the table, whichever is larger: each batch's lookups then
        scan at most that many rows, not everything the run wrote before it."""
        tbl = self.table(name)
        total = int(tbl.count_rows())
        stale = self._unindexed.get(name)
        if stale is None:  # first write through this view: what is there already
            indexes = {ix.name: ix for ix in tbl.list_indices()}
            if all(f"{c}_idx" in indexes for c in columns):
                stale = max(
                    int(getattr(indexes[f"{c}_idx"], "num_unindexed_rows", 0) or 0) for c in columns
                )
            else:
                stale = total
        else:
            stale += written
        if total and stale >= min(
            total, max(KEY_INDEX_STALE_ROWS, int(KEY_INDEX_STALE_SHARE * total))
        ):
            for column in columns:
                build_key_index(tbl, column)
            stale = 0
        self._unindexed[name] = stale

    # ---- runs --------------------------------------------------------------------------

    def record_run(self, row: dict[str, Any]) -> None:
        tbl = self.runs()
        tbl.add(pa.Table.from_pylist([row], schema=RUNS_SCHEMA).select(tbl.schema.names))

    def record_evaluations(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            tbl = self._ensure(EVALUATIONS, EVALUATIONS_SCHEMA)
            tbl.add(pa.Table.from_pylist(rows, schema=EVALUATIONS_SCHEMA).select(tbl.schema.names))

    def evaluation_history(self, dataset_key: str) -> list[dict[str, Any]]:
        """Earlier evaluations of a dataset (by its identity), oldest first."""
        if not self.has(EVALUATIONS):
            return []
        tbl = self._ensure(EVALUATIONS, EVALUATIONS_SCHEMA)
        rows = (
            tbl.search()
            .where(f"dataset_key = {sql_str(dataset_key)}")
            .limit(None)
            .to_arrow()
            .to_pylist()
        )
        rows.sort(key=lambda r: r["evaluated_at"])
        return rows

    def document_ids(self) -> set[str]:
        """Ids of the documents indexed (status ok)."""
        if not self.has(self.documents_name):
            return set()
        data = (
            self.table(self.documents_name)
            .search()
            .where("status = 'ok'")
            .select(["doc_id"])
            .limit(None)
            .to_arrow()
        )
        return set(data.column("doc_id").to_pylist())

    # ---- indexes and upkeep ------------------------------------------------------------

    def index_names(self) -> set[str]:
        if not self.has_chunks():
            return set()
        return {ix.name for ix in self.table(self.chunks_name).list_indices()}

    def indexes_current(self) -> bool:
        names = self.index_names()
        return {"text_idx", "text_cjk_idx"} <= names

    def refresh_indexes(
        self,
        vector_index_min_rows: int,
        cleanup_older_than: timedelta | None,
        changed: bool,
        vector_beside: bool = False,
    ) -> dict[str, Any]:
        """Create missing indexes, fold new rows into existing ones, compact and prune.
        Returns the indexes, those created, the row count, the refresh's wall seconds
        (`wall_seconds`) and each step's (`seconds`: compaction, text_idx, text_cjk_idx,
        key_indexes, vector_idx, then optimize (folding rows into indexes there were before)
        or prune (every index covers every row already: version cleanup only), upkeep; a
        step with nothing to do is absent).

        `vector_beside`: a new vector index builds in a thread beside the full-text and key
        indexes (its seconds then overlap theirs, and `vector_idx_wait` is the wait for it
        after them). Those build on one core each and the IVF-PQ build keeps about 1.8 busy:
        at 1.45 M rows on 2 cores, 43.0-44.6 s for all of them instead of 52.0-52.5. The two
        builds' memory adds up, though: where the refresh is the run's peak (the default
        runner's, 1.010 -> 1.068 GiB at 100k documents) it stays off; the Ray runner, whose
        peak is its workers' and which stopped them before the refresh, turns it on."""
        if not self.has_chunks():
            return {"indexes": []}
        tbl = self.table(self.chunks_name)
        seconds: dict[str, float] = {}
        clock = started = time.perf_counter()

        def lap(step: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[step] = round(seconds.get(step, 0.0) + now - clock, 3)
            clock = now

        compacted = False
        if changed:
            # the key indexes a run's writes kept (_keep_key_indexes) miss its last batches:
            # when no other index lags, those B-trees are rebuilt (about a second each at a
            # million rows) before the compaction, which then merges every fragment as one
            # group, and the optimize below is spared (its index step rewrites the vector
            # index even with nothing to fold: 7.6-9.6 s at 1.45 M rows)
            stale = {n for n in self.index_names() if unindexed_rows(tbl, n)}
            if stale and stale <= {f"{c}_idx" for c in CHUNK_KEYS}:
                for column in CHUNK_KEYS:
                    if f"{column}_idx" in stale:
                        build_key_index(tbl, column)
                lap("key_indexes")
            # before the indexes are built: they then cover few large fragments, and there is
            # less to remap (a first run's every batch is a fragment)
            compacted = self._compact(tbl)
            lap("compaction")
        names = self.index_names()  # after the compaction, which remaps them
        created: list[str] = []
        rows = tbl.count_rows()
        vector: Future[float] | None = None
        pool = None
        build_vector = "vector_idx" not in names and rows >= vector_index_min_rows
        if build_vector and vector_beside:
            pool = ThreadPoolExecutor(1, thread_name_prefix="vector-index")
            vector = pool.submit(_timed, build_vector_index, tbl)
        try:
            if "text_idx" not in names:
                build_text_index(tbl)
                created.append("text_idx")
                lap("text_idx")
            crash_point("during-index-refresh")
            if "text_cjk_idx" not in names:
                build_cjk_index(tbl)
                created.append("text_cjk_idx")
                lap("text_cjk_idx")
            for column in CHUNK_KEYS:
                if f"{column}_idx" not in names and rows:
                    build_key_index(tbl, column)
                    created.append(f"{column}_idx")
                    lap("key_indexes")
        finally:
            if pool is not None:
                pool.shutdown(wait=True)  # no index build outlives the refresh, failed or not
        release_free_heap()  # what a call freed is not kept while the next runs (tasks.memory)
        if vector is not None:
            seconds["vector_idx"] = vector.result()  # its error, should it have failed
            created.append("vector_idx")
            lap("vector_idx_wait")  # the wait for it once the others were built
        elif build_vector:
            # one index at a time (see vector_beside)
            build_vector_index(tbl)
            created.append("vector_idx")
            release_free_heap()
            lap("vector_idx")
        if changed:
            if not compacted or any(unindexed_rows(tbl, n) for n in self.index_names()):
                # folding rows into the indexes: new rows into those there were before (an
                # IVF-PQ index built on a few hundred rows may leave some out too), compacting
                # should the page copy above have failed, and pruning old versions
                optimize(tbl, cleanup_older_than)
                release_free_heap()
                lap("optimize")
            else:
                # every index covers every row: old versions are pruned all the same
                prune(tbl, cleanup_older_than, self.cache_size, self.uri)
                lap("prune")
            self.upkeep(cleanup_older_than)
            lap("upkeep")
        return {
            "indexes": sorted(self.index_names()),
            "created": created,
            "rows": rows,
            "seconds": seconds,
            "wall_seconds": round(time.perf_counter() - started, 3),
        }

    def _compact(self, tbl: Any) -> bool:
        """`compact_fragments` (True: done); should it fail, the indexes are built all the
        same and `optimize` compacts the lancedb way, with a warning (credentials redacted)."""
        try:
            compact_fragments(tbl, cache_size=self.cache_size, db_uri=self.uri)
            return True
        except Exception as exc:
            from tasks.storage import redact_text

            why = redact_text(f"{type(exc).__name__}: {exc}", self.db.storage_options)
            log.warning("compacting %s by page copy failed, optimize compacts: %s", tbl.name, why)
            return False
        finally:
            release_free_heap()

    def upkeep(self, cleanup_older_than: timedelta | None) -> list[str]:
        """Compaction and old-version cleanup for the manifest and the bookkeeping tables."""
        done = []
        for name in (self.documents_name, *_UPKEEP_TABLES):
            if not self.has(name):
                continue
            tbl = self.table(name)
            if name == self.documents_name and tbl.count_rows():
                if "doc_key_idx" not in {ix.name for ix in tbl.list_indices()}:
                    build_key_index(tbl, "doc_key")
            optimize(tbl, cleanup_older_than)
            done.append(name)
        return done


_SQL_TYPES = {
    pa.int64(): "BIGINT",
    pa.int32(): "INT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.string(): "STRING",
    pa.timestamp("us", tz="UTC"): "TIMESTAMP",
}


# ---- the chunks table's indexes, as `Store.refresh_indexes` builds them ----------------------


def build_text_index(tbl: Any) -> None:
    """text_idx: English full-text search (stemmed, stop words out, case and accents folded)."""
    tbl.create_fts_index(
        "text",
        replace=True,
        language="English",
        stem=True,
        remove_stop_words=True,
        lower_case=True,
        ascii_folding=True,
    )


def build_cjk_index(tbl: Any) -> None:
    """text_cjk_idx: character bigrams of the CJK text, for Korean, Chinese and Japanese."""
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


def build_key_index(tbl: Any, column: str) -> None:
    """A B-tree on a key column (CHUNK_KEYS, the manifest's doc_key): lookups and deletes."""
    tbl.create_scalar_index(column, index_type="BTREE", replace=True)


def build_vector_index(tbl: Any) -> None:
    """vector_idx: IVF-PQ with LanceDB's defaults, cosine distance."""
    tbl.create_index(metric="cosine", vector_column_name="vector", replace=True)


def _add_missing_columns(tbl: Any, schema: pa.Schema) -> None:
    """A bookkeeping table written by an older lanceflow gets the columns added since, as
    nulls for its old rows (the runs and evaluations history is kept, not rewritten)."""
    have = set(tbl.schema.names)
    missing = {
        f.name: f"CAST(NULL AS {_SQL_TYPES[f.type]})"
        for f in schema
        if f.name not in have and f.type in _SQL_TYPES
    }
    if missing:
        log.info("adding columns %s to %s", ", ".join(missing), tbl.name)
        tbl.add_columns(missing)


def keep_tagged(tbl: Any, older_than: timedelta | None) -> timedelta | None:
    """The cleanup age that spares every tagged version: Lance refuses a cleanup that would
    remove a tagged version, so versions are pruned only up to the oldest tag."""
    if older_than is None:
        return None
    tagged = {int(t["version"]) for t in tbl.tags.list().values()}
    if not tagged:
        return older_than
    oldest = min(tagged)
    stamps = [v["timestamp"] for v in tbl.list_versions() if int(v["version"]) == oldest]
    if not stamps:
        return older_than
    # Lance gives a naive local time; astimezone reads a naive one as local
    age = datetime.now(UTC) - stamps[0].astimezone(UTC) + timedelta(seconds=1)
    return max(older_than, age)


#: an age no version reaches: LanceDB's optimize() cleans up after 7 days unless told otherwise
_NO_CLEANUP = timedelta(days=36_500)


def compact_fragments(
    tbl: Any, mode: str = "try_binary_copy", *, cache_size: int, db_uri: str = ""
) -> Any:
    """Merge a table's small fragments by copying their encoded pages into larger files
    (Lance's binary copy; it falls back to decoding and re-encoding where the files differ in
    format). lancedb's own compaction (in `optimize`) decodes every row and re-encodes it,
    which at the end of a large first run, with one small fragment per batch, was the run's
    largest working set and grew with the table (1.46 M rows in 392 fragments: 439 MiB of
    heap; by page copy 16-26 MiB, in half the time: benchmarks/index_memory.py). Indexes that
    exist are remapped to the new row addresses, as by `optimize`. Fragments with deleted
    rows (a later run's replaced documents) are re-encoded either way."""
    # pylance opens its own handle: the same cache bounds as the lancedb connection's, and
    # an s3+ddb table's commit store
    ds = lance_of(tbl, cache_size, db_uri)
    metrics = ds.optimize.compact_files(compaction_mode=mode)
    tbl.checkout_latest()  # the compaction committed a version lancedb's handle has not seen
    return metrics


def optimize(tbl: Any, cleanup_older_than: timedelta | None, retrain: bool = False) -> Any:
    """Compaction, index folding and old-version cleanup (None: no cleanup) that never removes
    a tagged version; should Lance still find one in the way, the cleanup waits for next time."""
    import warnings

    if cleanup_older_than is None:
        cleanup_older_than = _NO_CLEANUP
    with warnings.catch_warnings():
        # a zero retention is a deliberate setting here, not the accident Lance warns about
        warnings.filterwarnings("ignore", message="optimize.cleanup_older_than=0")
        try:
            return tbl.optimize(
                cleanup_older_than=keep_tagged(tbl, cleanup_older_than),
                retrain=retrain,
            )
        except RuntimeError as exc:
            if "tagged version" not in str(exc):
                raise
            log.warning("version cleanup of %s skipped: %s", tbl.name, exc)
            return tbl.optimize(cleanup_older_than=_NO_CLEANUP, retrain=retrain)


def _timed(fn: Any, *args: Any) -> float:
    """fn(*args), for its wall seconds."""
    clock = time.perf_counter()
    fn(*args)
    return round(time.perf_counter() - clock, 3)


def prune(tbl: Any, cleanup_older_than: timedelta | None, cache_size: int, db_uri: str = "") -> Any:
    """`optimize`'s version cleanup alone (None: none), sparing every tagged version."""
    older_than = keep_tagged(tbl, cleanup_older_than)
    if older_than is None:
        return None
    stats = lance_of(tbl, cache_size, db_uri).cleanup_old_versions(
        older_than=older_than, error_if_tagged_old_versions=False
    )
    tbl.checkout_latest()
    return stats


def unindexed_rows(tbl: Any, index: str) -> int:
    """Rows of the table an index does not cover yet (0: none, or no such index)."""
    stats = tbl.index_stats(index)
    return int(stats.num_unindexed_rows) if stats is not None else 0


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])


def report_json(report: Any) -> str:
    return json.dumps(report, default=str, ensure_ascii=False)


def open_store(settings: Any, cache_mb: float = READ_CACHE_MB) -> Store:
    """The Store for a StoreSettings: its location, storage options and credentials block."""
    return store_at(settings.uri, settings.access, cache_mb)


def table_options(uri: str, access: Any = None) -> dict[str, str]:
    """The storage options a table at `uri` opens with, given a TableAccess (None: the
    environment only); credentials blocks are read here."""
    from tasks.storage import lance_options

    if access is None:
        return lance_options(uri, None)
    return lance_options(uri, access.storage_options, access.credentials_block)


def store_at(uri: str, access: Any = None, cache_mb: float = READ_CACHE_MB) -> Store:
    """The Store at `uri` with a TableAccess (None: the environment only)."""
    return Store(uri, storage_options=table_options(uri, access), cache_mb=cache_mb)
