"""Scoring a table against a query set, comparing with the last run, and the gate."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.embedders.base import Embedder
from tasks.errors import TableError
from tasks.evaluation import QuerySet, retrieve_documents
from tasks.metrics import score_run
from tasks.search import Mode, embedder_for_table
from tasks.store import Store

log = logging.getLogger(__name__)


@dataclass
class ModeResult:
    mode: str
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    top: dict[str, list[tuple[str, float]]]  # the top documents per query


@dataclass
class Evaluation:
    dataset: str
    dataset_key: str
    location: str
    generation: int
    table_version: int
    model: str
    queries: int
    unknown_documents: int
    unknown_queries: int
    results: dict[str, ModeResult] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "dataset_key": self.dataset_key,
            "generation": self.generation,
            "table_version": self.table_version,
            "model": self.model,
            "queries": self.queries,
            "unknown_documents": self.unknown_documents,
            "unknown_queries": self.unknown_queries,
            "results": {
                m: {k: round(v, 6) for k, v in r.metrics.items()} for m, r in self.results.items()
            },
        }


def evaluate_table(
    store: Store,
    query_set: QuerySet,
    modes: Sequence[Mode],
    ks: Sequence[int],
    embedder: Embedder | None = None,
) -> Evaluation:
    """Score every mode on the judged queries, through the same search path as the CLI."""
    model = store.table_model()
    if model is None or store.chunks_table().count_rows() == 0:
        raise TableError(
            f"the table at {store.uri!r} is empty: ingest the documents the query set judges first"
        )
    judged = query_set.judged
    if not judged:
        raise TableError(f"{query_set.name}: no query has a relevance judgment")
    known = store.document_ids()
    unknown_docs = {d for docs in query_set.qrels.values() for d in docs if d not in known}
    if unknown_docs:
        log.warning(
            "%d judged document ids are not in the table (e.g. %s): those judgments can "
            "never be met",
            len(unknown_docs),
            ", ".join(sorted(unknown_docs)[:5]),
        )
    if any(m != "fts" for m in modes) and embedder is None:
        embedder = embedder_for_table(store)
    ev = Evaluation(
        dataset=query_set.name,
        dataset_key=query_set.key,
        location=query_set.location,
        generation=store.generation_number,
        table_version=store.version(),
        model=model.model_id,
        queries=len(judged),
        unknown_documents=len(unknown_docs),
        unknown_queries=len(query_set.unknown_queries),
    )
    depth = max(max(ks), 10)
    qids = list(judged)
    texts = [judged[q] for q in qids]
    for mode in modes:
        ranked = retrieve_documents(store, texts, mode, depth, embedder)
        run = {q: dict(docs) for q, docs in zip(qids, ranked, strict=True)}
        means, per_query = score_run(query_set.qrels, run, ks)
        ev.results[mode] = ModeResult(mode, means, per_query, dict(zip(qids, ranked, strict=True)))
    return ev


def baseline_results(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode, the row a new run is compared with: the latest run that passed its gate or
    that an operator accepted (`--accept`). A failed run never becomes the baseline, so a
    regression keeps failing night after night until it is fixed or accepted."""
    last: dict[str, dict[str, Any]] = {}
    for row in history:  # oldest first
        if row.get("passed") or row.get("accepted"):
            last[row["mode"]] = row
    return last


def _when(row: dict[str, Any]) -> str:
    at: Any = row.get("evaluated_at")
    return at.strftime("%Y-%m-%d %H:%M UTC") if hasattr(at, "strftime") else str(at)


def gate_violations(
    ev: Evaluation,
    previous: dict[str, dict[str, Any]],
    min_ndcg_at_10: float | None,
    max_drop: float | None,
) -> list[str]:
    """Human-readable reasons the gate fails (empty: it passes)."""
    problems: list[str] = []
    for mode, res in ev.results.items():
        value = res.metrics.get("ndcg@10", 0.0)
        if min_ndcg_at_10 is not None and value < min_ndcg_at_10:
            problems.append(
                f"{mode} ndcg@10 = {value:.4f} is below min_ndcg_at_10 = {min_ndcg_at_10:.4f} "
                f"(table version {ev.table_version})"
            )
        prev = previous.get(mode)
        if max_drop is not None and prev is not None and prev.get("ndcg_at_10") is not None:
            drop = float(prev["ndcg_at_10"]) - value
            if drop > max_drop:
                how = "accepted" if prev.get("accepted") else "passed"
                problems.append(
                    f"{mode} ndcg@10 fell from {prev['ndcg_at_10']:.4f} (the last {how} run, "
                    f"{_when(prev)}, generation {prev.get('generation') or 1} table version "
                    f"{prev['table_version']}) to {value:.4f} (generation {ev.generation} table "
                    f"version {ev.table_version}): a drop of {drop:.4f} > max_drop = "
                    f"{max_drop:.4f}. Fix the index, or after reviewing it pin this run as the "
                    "new baseline with `lanceflow evaluate ... --accept`"
                )
    return problems
