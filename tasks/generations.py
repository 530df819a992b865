"""Index generations: the chunks and documents tables built with one set of settings.

A database directory holds one *live* generation (what search and evaluation read), at most one
*building* generation per fingerprint (a `--reindex` in progress, resumed by the next run with
the same settings) and *retired* ones kept for rollback. The `generations` table is the pointer:
switching is one commit to it (a single merge), so readers see either the old generation or the
new one, never a mix.

Generation 1 uses the table names `chunks` and `documents`; generation N those names with the
suffix `_gN`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from tasks.fingerprint import Fingerprint

log = logging.getLogger(__name__)

GENERATIONS = "generations"

LIVE = "live"
BUILDING = "building"
RETIRED = "retired"

GENERATIONS_SCHEMA = pa.schema(
    [
        pa.field("generation", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string()),
        pa.field("fingerprint_key", pa.string()),
        pa.field("embedding_key", pa.string()),
        pa.field("chunks_table", pa.string(), nullable=False),
        pa.field("documents_table", pa.string(), nullable=False),
        pa.field("sources", pa.string()),  # JSON list of the source URIs built into it
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("switched_at", pa.timestamp("us", tz="UTC")),
    ]
)


def table_names(number: int) -> tuple[str, str]:
    if number == 1:
        return "chunks", "documents"
    return f"chunks_g{number}", f"documents_g{number}"


@dataclass(frozen=True, slots=True)
class Generation:
    number: int
    status: str
    fingerprint: Fingerprint | None
    chunks_table: str
    documents_table: str
    sources: tuple[str, ...] = ()
    created_at: datetime | None = None
    switched_at: datetime | None = None
    #: False for a generation planned by this run but not yet written to the table
    persisted: bool = True

    @property
    def key(self) -> str:
        return self.fingerprint.key if self.fingerprint else ""

    @property
    def embedding_key(self) -> str:
        return self.fingerprint.embedding_key if self.fingerprint else ""

    def row(self) -> dict[str, Any]:
        return {
            "generation": self.number,
            "status": self.status,
            "fingerprint": self.fingerprint.to_json() if self.fingerprint else None,
            "fingerprint_key": self.key,
            "embedding_key": self.embedding_key,
            "chunks_table": self.chunks_table,
            "documents_table": self.documents_table,
            "sources": json.dumps(sorted(self.sources)),
            "created_at": self.created_at or datetime.now(UTC),
            "switched_at": self.switched_at,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Generation:
        return cls(
            number=int(row["generation"]),
            status=row["status"],
            fingerprint=Fingerprint.from_json(row.get("fingerprint")),
            chunks_table=row["chunks_table"],
            documents_table=row["documents_table"],
            sources=tuple(json.loads(row.get("sources") or "[]")),
            created_at=row.get("created_at"),
            switched_at=row.get("switched_at"),
        )


def planned(number: int, fingerprint: Fingerprint | None, status: str) -> Generation:
    chunks, documents = table_names(number)
    return Generation(
        number,
        status,
        fingerprint,
        chunks,
        documents,
        created_at=datetime.now(UTC),
        persisted=False,
    )


def _table(db: Any, create: bool) -> Any | None:
    if GENERATIONS in db.list_tables().tables:
        return db.open_table(GENERATIONS)
    if not create:
        return None
    return db.create_table(GENERATIONS, schema=GENERATIONS_SCHEMA, exist_ok=True)


def list_generations(db: Any) -> list[Generation]:
    tbl = _table(db, create=False)
    if tbl is None:
        return []
    rows = tbl.search().limit(None).to_arrow().to_pylist()
    return sorted((Generation.from_row(r) for r in rows), key=lambda g: g.number)


def live(generations: list[Generation]) -> Generation | None:
    return next((g for g in generations if g.status == LIVE), None)


def save(db: Any, *gens: Generation) -> list[Generation]:
    """Upsert generation rows in one commit (a switch writes both rows at once)."""
    tbl: Any = _table(db, create=True)
    data = pa.Table.from_pylist([g.row() for g in gens], schema=GENERATIONS_SCHEMA)
    (
        tbl.merge_insert("generation")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute(data)
    )
    return [replace(g, persisted=True) for g in gens]


def with_source(gen: Generation, source_uri: str) -> Generation:
    if source_uri in gen.sources:
        return gen
    return replace(gen, sources=(*gen.sources, source_uri))


def switch(db: Any, new: Generation, old: Generation | None) -> Generation:
    """Make `new` live and `old` retired, in one commit."""
    now = datetime.now(UTC)
    made_live = replace(new, status=LIVE, switched_at=now)
    if old is None:
        return save(db, made_live)[0]
    return save(db, made_live, replace(old, status=RETIRED, switched_at=now))[0]


def drop_old(db: Any, keep: int) -> list[int]:
    """Drop retired generations beyond the `keep` most recent, and abandoned builds whose
    settings a newer build replaced. The rows go first, then the tables, so a crash in between
    leaves only unreferenced tables (dropped by the next call)."""
    gens = list_generations(db)
    retired = sorted(
        (g for g in gens if g.status == RETIRED),
        key=lambda g: g.switched_at or g.created_at or datetime.min.replace(tzinfo=UTC),
        reverse=True,
    )
    doomed = retired[keep:]
    building = [g for g in gens if g.status == BUILDING]
    newest_build = max((g.number for g in building), default=0)
    doomed += [g for g in building if g.number < newest_build]
    tbl = _table(db, create=False)
    if doomed and tbl is not None:
        tbl.delete(f"generation IN ({', '.join(str(g.number) for g in doomed)})")
    referenced = {t for g in list_generations(db) for t in (g.chunks_table, g.documents_table)}
    existing = set(db.list_tables().tables)
    for name in sorted(existing - referenced):
        if name.startswith(("chunks_g", "documents_g")) or (
            name in ("chunks", "documents") and referenced
        ):
            db.drop_table(name)
            log.info("dropped %s (an old index generation)", name)
    return [g.number for g in doomed]
