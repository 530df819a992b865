"""The evaluate flow's Prefect tasks: thin wrappers over tasks.evaluation, tasks.scoring and
tasks.eval_report."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.eval_report import changes_markdown, chart_markdown, history_chart_svg, metrics_table
from tasks.evaluation import QuerySet, load_query_set
from tasks.scoring import Evaluation, evaluate_table, gate_violations
from tasks.settings import EvaluateParams
from tasks.store import Store


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60] or "dataset"


@task(name="load_queries", cache_policy=NO_CACHE, persist_result=False)
def load_queries(params: EvaluateParams) -> QuerySet:
    return load_query_set(params.dataset, params.split)


@task(
    name="score_table",
    retries=1,
    retry_delay_seconds=[5],
    cache_policy=NO_CACHE,
    persist_result=False,
)
def score_table(params: EvaluateParams, store: Store, query_set: QuerySet) -> Evaluation:
    embedder = None
    if params.query_embedder and any(m != "fts" for m in params.modes):
        from tasks.search import embedder_for_table

        embedder = embedder_for_table(store, **params.query_embedder)
    return evaluate_table(store, query_set, params.modes, params.ks, embedder)


@task(name="load_history", cache_policy=NO_CACHE, persist_result=False)
def load_history(store: Store, ev: Evaluation) -> list[dict[str, Any]]:
    """Earlier evaluations of this dataset (by its identity), oldest first."""
    return store.evaluation_history(ev.dataset_key)


@task(name="record_history", cache_policy=NO_CACHE, persist_result=False)
def record_history(
    params: EvaluateParams, store: Store, ev: Evaluation, passed: bool, flow_run_id: str | None
) -> list[dict[str, Any]]:
    """Append this run, whether it passed and the gate it was judged by; return the history."""
    now = datetime.now(UTC)
    run_id = str(uuid.uuid4())
    from tasks.versions import tag_of_version

    tag = tag_of_version(store, store.chunks_name, ev.table_version)
    gate = json.dumps(
        {
            **params.gate.model_dump(),
            "split": params.split,
            "modes": list(params.modes),
            "ks": list(params.ks),
        }
    )
    store.record_evaluations(
        [
            {
                "run_id": run_id,
                "flow_run_id": flow_run_id,
                "dataset": ev.dataset,
                "dataset_key": ev.dataset_key,
                "location": ev.location,
                "mode": mode,
                "generation": ev.generation,
                "table_version": ev.table_version,
                "model": ev.model,
                "queries": ev.queries,
                "ndcg_at_10": res.metrics.get("ndcg@10"),
                "metrics": json.dumps(res.metrics),
                "passed": passed,
                "accepted": params.accept,
                "gate": gate,
                "evaluated_at": now,
                "tag": tag,
            }
            for mode, res in ev.results.items()
        ]
    )
    return store.evaluation_history(ev.dataset_key)


@task(name="publish_results", cache_policy=NO_CACHE, persist_result=False)
def publish_results(
    params: EvaluateParams,
    ev: Evaluation,
    query_set: QuerySet,
    previous: dict[str, dict[str, Any]],
    history: list[dict[str, Any]],
    problems: list[str],
) -> None:
    key = _slug(ev.dataset)
    create_table_artifact(
        metrics_table(ev), key=f"eval-{key}-metrics", description=f"{ev.dataset}: modes x metrics"
    )
    create_markdown_artifact(
        changes_markdown(ev, previous, query_set, params.worst_queries, problems),
        key=f"eval-{key}-changes",
        description="change from the baseline (the last passed or accepted run), worst queries",
    )
    svg = history_chart_svg(history, ev.dataset)
    path: str | None = None
    if "://" not in params.store.uri:
        folder = os.path.join(params.store.uri, "reports")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{key}-ndcg-history.svg")
        with open(path, "wb") as fh:
            fh.write(svg)
    create_markdown_artifact(
        chart_markdown(svg, ev.dataset, path),
        key=f"eval-{key}-history",
        description="nDCG@10 over the evaluation runs",
    )


def check_gate(
    params: EvaluateParams, ev: Evaluation, previous: dict[str, dict[str, Any]]
) -> list[str]:
    return gate_violations(ev, previous, params.gate.min_ndcg_at_10, params.gate.max_drop)


def last_good_tag(history: list[dict[str, Any]]) -> str | None:
    """The version tag of the latest evaluation of this dataset that passed or was accepted."""
    for row in reversed(history):
        if (row.get("passed") or row.get("accepted")) and row.get("tag"):
            return str(row["tag"])
    return None
