"""The fast path of a `--reindex` that changes only the embedding: vectors recomputed from the
stored chunk texts, nothing re-read, re-parsed or re-chunked.

When the new settings differ from the live generation's in embedding fields only (a new
revision of the model, another backend or precision, another OpenAI embedding model or
`--dimensions` with the same tokenizer, chunk size and overlap), the new generation's chunks
are exactly the live one's, with other vectors. So the new generation starts as a copy of the
live one:

  1. the live chunks table is deep-cloned (Lance copies its data files as they are: no row is
     decoded or re-encoded) and its `vector` column dropped (a metadata change);
  2. a new `vector` column is computed from the `text` column by Lance's `add_columns` (one
     new data file per fragment beside the untouched ones, one commit); on `--runner ray`,
     lance-ray's `add_columns` spreads the fragments over the cluster;
  3. the live manifest is copied, and every source of the live generation counts as built.

The run then goes on as any reindex: the plan compares the source with the copied manifest,
so only documents changed since the live build are read and embedded, and the generation
switches when it is complete. A failure part-way drops the half-built tables and the run
continues the slow way (read, parse, chunk, embed everything).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.fingerprint import EMBEDDING_FIELDS, Fingerprint, differences

log = logging.getLogger(__name__)


def embedding_only(live: Fingerprint | None, new: Fingerprint) -> bool:
    """Whether `new` differs from `live` in embedding settings and nothing else."""
    if live is None:
        return False
    diffs = differences(live, new)
    return bool(diffs) and all(name in EMBEDDING_FIELDS for name, _, _ in diffs)


class VectorColumn:
    """The add_columns transform: a batch of (text, text_hash) -> the `vector` column.
    Picklable (settings and a key, not a model): a Ray worker builds its embedder once."""

    def __init__(self, settings: Any, api_key: Any, field: pa.Field) -> None:
        self.settings = settings
        self.api_key = api_key
        self.field = field
        self._embedder: Any = None
        self.embedded = 0

    def _model(self) -> Any:
        if self._embedder is None:
            from tasks.embedding import build_embedder

            self._embedder = build_embedder(self.settings, api_key=self.api_key)
        return self._embedder

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        from tasks.store import vectors_to_arrow

        texts = batch.column("text").to_pylist()
        hashes = batch.column("text_hash").to_pylist()
        unique: dict[str, str] = {}
        for h, t in zip(hashes, texts, strict=True):
            unique.setdefault(h, t)
        keys = list(unique)
        vectors = np.asarray(self._model().embed([unique[h] for h in keys]), dtype=np.float32)
        self.embedded += len(keys)
        row_of = {h: i for i, h in enumerate(keys)}
        matrix = vectors[[row_of[h] for h in hashes]] if hashes else vectors[:0]
        column = vectors_to_arrow(matrix).cast(self.field.type)
        return pa.RecordBatch.from_arrays([column], schema=pa.schema([self.field]))


def _sibling(dataset_uri: str, old_name: str, new_name: str) -> str:
    """The Lance dataset URI of table `new_name` in the database of `dataset_uri`."""
    base = dataset_uri.rstrip("/")
    suffix = f"{old_name}.lance"
    if not base.endswith(suffix):
        raise ValueError(f"unexpected table location {base!r}")
    return base[: -len(suffix)] + f"{new_name}.lance"


def seed_generation(run: Any) -> int | None:
    """Build the run's new generation from the live one when only the embedding changed.
    Returns the chunks embedded, or None when the fast path does not apply (or failed and
    was undone: the run then builds the generation the slow way)."""
    from tasks.store import chunks_schema

    target, live = run.target, run.live
    if (
        live is None
        or target.persisted
        or target.status != "building"
        or not embedding_only(live.fingerprint, run.fingerprint)
    ):
        return None
    live_store = run.store.at(live)
    if not live_store.has_chunks():
        return None
    db = run.store.db
    for name in (target.chunks_table, target.documents_table):  # a crashed attempt's leftovers
        if name in run.store.names():
            db.drop_table(name)
    try:
        return _seed(run, live_store, chunks_schema)
    except Exception as exc:
        from tasks.storage import redact_text

        log.warning(
            "the embedding-only fast path failed (%s); rebuilding generation %d from the "
            "source instead",
            redact_text(f"{type(exc).__name__}: {exc}"),
            target.number,
        )
        for name in (target.chunks_table, target.documents_table):
            if name in run.store.names():
                db.drop_table(name)
        run.store._tables.clear()
        return None


def _seed(run: Any, live_store: Any, chunks_schema: Any) -> int:
    import lance

    from tasks.embedding import resolved_api_key
    from tasks.store import lance_of, open_lance, table_options, write_uri

    params = run.params
    target, live = run.target, run.live
    options = table_options(params.store.uri, params.store.access) or None
    live_ds = lance_of(live_store.chunks_table(), run.store.cache_size)
    # the new generation's dataset; an s3+ddb table's writes go through its commit store
    uri = write_uri(params.store.uri, _sibling(live_ds.uri, live.chunks_table, target.chunks_table))
    live_ds.deep_clone(uri, live_ds.version, storage_options=options)
    ds = open_lance(uri, options, cache_size=run.store.cache_size)
    ds.drop_columns(["vector"])
    dim = run.fingerprint.dimension or run.embedder.dimension
    schema = chunks_schema(dim, run.fingerprint.model, params.embedder.kind)
    column = VectorColumn(
        params.embedder, resolved_api_key(params.embedder), schema.field("vector")
    )
    # with its output schema given, Lance does not call the transform on a sample first
    transform = lance.batch_udf(output_schema=pa.schema([schema.field("vector")]))(column)
    rows = ds.count_rows()
    if params.runner == "ray":
        import lance_ray

        from tasks.ray_runner import ray_session, worker_env

        with ray_session(params.ray_address, params.ray_cpus, params.ray_memory):
            lance_ray.add_columns(
                uri,
                transform=transform,
                read_columns=["text", "text_hash"],
                storage_options=options,
                concurrency=params.ray_workers,
                ray_remote_args={"runtime_env": {"env_vars": worker_env()}},
            )
        embedded = rows  # the workers' counts stay there: rows (a repeated text is sent once)
    else:
        ds.add_columns(transform, read_columns=["text", "text_hash"])
        embedded = column.embedded
    ds = open_lance(uri, options, cache_size=run.store.cache_size)
    ds.replace_schema_metadata({k.decode(): v.decode() for k, v in schema.metadata.items()})
    # the manifest, as it stands for every source of the live generation
    docs = lance_of(live_store.table(live.documents_table), run.store.cache_size)
    run.store.db.create_table(target.documents_table, data=docs.to_batches(), schema=docs.schema)
    run.store._tables.clear()
    from tasks import generations

    for source in live.sources:
        run.target = generations.with_source(run.target, source)
    log.info(
        "generation %d: %d chunks of generation %d re-embedded from their stored text "
        "(only the embedding settings changed)",
        target.number,
        rows,
        live.number,
    )
    return int(embedded)
