"""Version tags and rollback: the last good version of a table, one command away.

Every successful ingest tags the LanceDB versions it produced (the generation's chunks and
documents tables, one tag name for both) and records the tag in the `version_tags` table.
`rollback` restores a tagged pair of versions; the restore is itself a new version, so it can
be undone with another rollback `--to` the later tag. Without `--to` it goes to the parent of
the tag the table stands at: the tag the table stood at when that one was made. So repeating it
steps further back along what the table was built on, never onto a version a rollback already
rejected.

Lance keeps tagged versions through cleanup (tasks.store.keep_tagged); `prune_tags` drops the
tags the maintenance flow no longer needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from tasks import generations
from tasks.errors import ConfigurationError
from tasks.store import Store, sql_str

log = logging.getLogger(__name__)

VERSION_TAGS = "version_tags"
INGEST = "ingest"
ROLLBACK = "rollback"
#: maintenance compacted the tables: new versions, the same content as the tag in `restored`
MAINTENANCE = "maintenance"

VERSION_TAGS_SCHEMA = pa.schema(
    [
        pa.field("tag", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # ingest | rollback
        pa.field("generation", pa.int64()),
        pa.field("chunks_table", pa.string()),
        pa.field("chunks_version", pa.int64()),
        pa.field("documents_table", pa.string()),
        pa.field("documents_version", pa.int64()),
        pa.field("run_id", pa.string()),
        pa.field("restored", pa.string()),  # rollback, maintenance: the tag of the content
        pa.field("parent", pa.string()),  # ingest: the tag the table stood at before
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True, slots=True)
class TagRow:
    tag: str
    kind: str
    generation: int
    chunks_table: str
    chunks_version: int
    documents_table: str
    documents_version: int
    run_id: str
    restored: str | None
    created_at: datetime
    parent: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TagRow:
        values: dict[str, Any] = {k: row.get(k) for k in cls.__dataclass_fields__}
        return cls(**values)


def _table(store: Store) -> Any:
    return store._ensure(VERSION_TAGS, VERSION_TAGS_SCHEMA)


def history(store: Store) -> list[TagRow]:
    """Every tag and rollback of the table, oldest first."""
    if not store.has(VERSION_TAGS):
        return []
    rows = _table(store).to_arrow().to_pylist()
    rows.sort(key=lambda r: (r["created_at"], r["kind"] != INGEST))
    return [TagRow.from_row(r) for r in rows]


def ingest_tags(store: Store) -> list[TagRow]:
    return _ingest(history(store))


def _ingest(rows: list[TagRow]) -> list[TagRow]:
    return [r for r in rows if r.kind == INGEST]


def _standing(rows: list[TagRow]) -> str | None:
    """The tag whose content the table holds, from its history (see current_tag)."""
    if not rows:
        return None
    last = rows[-1]
    return last.tag if last.kind == INGEST else last.restored


def _tag_name(run_id: str, when: datetime) -> str:
    return f"ingest-{when.strftime('%Y%m%dT%H%M%SZ')}-{run_id.replace('-', '')[:8]}"


def tag_version(store: Store, run_id: str) -> str:
    """Tag the generation's current chunks and documents versions; a version already tagged
    by an earlier run (a run that changed nothing) keeps its tag, which is returned."""
    if not store.has_chunks():
        return ""
    chunks = store.table(store.chunks_name)
    docs = store.documents()
    chunks_version, docs_version = int(chunks.version), int(docs.version)
    rows = history(store)
    for row in reversed(rows):
        if (
            row.chunks_table == store.chunks_name
            and row.chunks_version == chunks_version
            and row.documents_version == docs_version
        ):
            # unchanged since a tag, or since a rollback restored one
            name = row.tag if row.kind == INGEST else row.restored
            if name and name in chunks.tags.list():
                return name
    parent = _standing(rows)
    now = datetime.now(UTC)
    name = _tag_name(run_id, now)
    chunks.tags.create(name, chunks_version)
    docs.tags.create(name, docs_version)
    _table(store).add(
        pa.Table.from_pylist(
            [
                {
                    "tag": name,
                    "kind": INGEST,
                    "generation": store.generation_number,
                    "chunks_table": store.chunks_name,
                    "chunks_version": chunks_version,
                    "documents_table": store.documents_name,
                    "documents_version": docs_version,
                    "run_id": run_id,
                    "restored": None,
                    "parent": parent,
                    "created_at": now,
                }
            ],
            schema=VERSION_TAGS_SCHEMA,
        )
    )
    log.info("tagged %s: chunks v%d, documents v%d", name, chunks_version, docs_version)
    return name


def current_tag(store: Store) -> str | None:
    """The tag whose content the table holds: the latest ingest tag, or what the last rollback
    restored (a maintenance row keeps the tag it compacted)."""
    return _standing(history(store))


def record_same_content(store: Store, kind: str = MAINTENANCE) -> None:
    """After a rewrite that keeps the content (compaction), map the new versions to the tag the
    table stands at, so the next unchanged run does not tag the same content again."""
    tag = current_tag(store)
    if not tag or not store.has_chunks():
        return
    _append(
        store,
        tag=f"{kind}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}",
        kind=kind,
        restored=tag,
        chunks_table=store.chunks_name,
        documents_table=store.documents_name,
        generation=store.generation_number,
    )


def _append(store: Store, **row: Any) -> None:
    now = datetime.now(UTC)
    chunks_table, documents_table = row["chunks_table"], row["documents_table"]
    full = {
        "run_id": "",
        "parent": None,
        "created_at": now,
        "chunks_version": int(store.db.open_table(chunks_table).version),
        "documents_version": int(store.db.open_table(documents_table).version),
        **row,
    }
    _table(store).add(pa.Table.from_pylist([full], schema=VERSION_TAGS_SCHEMA))


def rollback_target(store: Store, to: str | None) -> TagRow:
    """The tag `--to` names, or the ingest tag before the one the table stands at."""
    rows = history(store)
    tags = _ingest(rows)
    if not tags:
        raise ConfigurationError(
            f"no tagged versions in {store.uri!r}: a successful ingest tags the version it "
            "produces; there is nothing to roll back to yet"
        )
    if to is not None:
        chosen = next((t for t in tags if t.tag == to), None)
        if chosen is None:
            raise ConfigurationError(
                f"no tag {to!r} in {store.uri!r}; the tags are: "
                + ", ".join(t.tag for t in tags[-10:])
                + f" (`lanceflow rollback --table {store.uri} --list` shows them all)"
            )
        return chosen
    by_name = {t.tag: t for t in tags}
    current = by_name.get(_standing(rows) or "", tags[-1])
    if not current.parent:
        raise ConfigurationError(
            f"{store.uri!r} stands at its oldest tag {current.tag!r}: nothing earlier to roll "
            "back to"
        )
    if current.parent not in by_name:
        raise ConfigurationError(
            f"the tag before {current.tag!r} ({current.parent!r}) was pruned by maintenance; "
            f"choose one with --to (`lanceflow rollback --table {store.uri} --list`)"
        )
    return by_name[current.parent]


def rollback(store: Store, to: str | None = None) -> TagRow:
    """Restore the chunks and documents tables of a tagged version (new versions, so the
    rollback can itself be undone); switch generation when the tag belongs to another one."""
    target = rollback_target(store, to)
    if not store.has(target.chunks_table) or not store.has(target.documents_table):
        raise ConfigurationError(
            f"the tables of tag {target.tag!r} (generation {target.generation}) were dropped; "
            "choose a later tag with --to"
        )
    gens = store.generations()
    live = generations.live(gens)
    if live is not None and live.number != target.generation:
        chosen = next((g for g in gens if g.number == target.generation), None)
        if chosen is None:
            raise ConfigurationError(
                f"generation {target.generation} of tag {target.tag!r} is gone; choose a "
                "later tag with --to"
            )
        generations.switch(store.db, chosen, live)
        log.info("generation %d is live again", chosen.number)
    for name in (target.chunks_table, target.documents_table):
        tbl = store.db.open_table(name)
        tbl.restore(target.tag)
    now = datetime.now(UTC)
    _append(
        store,
        tag=f"rollback-{now.strftime('%Y%m%dT%H%M%S%fZ')}",
        kind=ROLLBACK,
        generation=target.generation,
        chunks_table=target.chunks_table,
        documents_table=target.documents_table,
        restored=target.tag,
        created_at=now,
    )
    return target


def tag_of_version(store: Store, chunks_table: str, chunks_version: int) -> str | None:
    """The ingest tag of one chunks version, or None."""
    for row in reversed(history(store)):
        if row.chunks_table == chunks_table and row.chunks_version == chunks_version:
            return row.tag if row.kind == INGEST else row.restored
    return None


def prune_tags(store: Store, keep: int, protect: set[str]) -> list[str]:
    """Drop all but the newest `keep` ingest tags, never one in `protect` (the last good
    one, the one the table stands at). Their versions become eligible for cleanup."""
    rows = history(store)
    tags = _ingest(rows)
    protected = protect | {t.tag for t in tags[-keep:]}
    current = _standing(rows)
    if current:
        protected.add(current)
    removed = []
    for row in tags:
        if row.tag in protected:
            continue
        for name in (row.chunks_table, row.documents_table):
            if store.has(name):
                tbl = store.table(name)
                if row.tag in tbl.tags.list():
                    tbl.tags.delete(row.tag)
        removed.append(row.tag)
    if removed:
        _table(store).delete(
            f"kind = 'ingest' AND tag IN ({', '.join(sql_str(t) for t in removed)})"
        )
    return removed
