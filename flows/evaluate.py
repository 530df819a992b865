"""The `evaluate` flow: score retrieval quality, compare with the last run, gate on it."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from pydantic import Field

from tasks.errors import LanceflowError
from tasks.eval_steps import (
    check_gate,
    last_good_tag,
    load_history,
    load_queries,
    publish_results,
    record_history,
    score_table,
)
from tasks.scoring import baseline_results
from tasks.settings import (
    DEFAULT_DB_URI,
    EvaluateOptions,
    EvaluateParams,
    GateSettings,
    QueryEmbedderSettings,
    TableAccess,
    evaluate_flow_parameters,
    evaluate_params,
)
from tasks.store import open_store


class QualityGateError(LanceflowError):
    """Retrieval quality broke the configured gate."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@flow(name="evaluate", persist_result=False, validate_parameters=True)
def evaluate(
    dataset: Annotated[str, Field(min_length=1)],
    table: Annotated[str, Field(min_length=1)] = DEFAULT_DB_URI,
    gate: GateSettings = GateSettings(),  # noqa: B008
    options: EvaluateOptions = EvaluateOptions(),  # noqa: B008
    query_embedder: QueryEmbedderSettings = QueryEmbedderSettings(),  # noqa: B008
    accept: bool = False,
    ingest_run: str | None = None,
    table_access: TableAccess = TableAccess(),  # noqa: B008
) -> dict[str, Any]:
    """Score the table on a labelled query set in every mode and fail when quality drops.

    Args:
        dataset: A BEIR folder (queries.jsonl, qrels/SPLIT.tsv) or a JSONL/CSV file of 'query'
            and 'relevant' document ids, as the worker sees it.
        table: The LanceDB database directory of the index to score.
        gate: When the run fails: a floor on nDCG@10, and the largest drop allowed versus the
            last evaluation that passed.
        options: The retrieval modes and cut-offs scored, the qrels split, worst queries shown.
        query_embedder: For a table built with the OpenAI embedder: endpoint and key for the
            query embeddings.
        accept: Pin this run as the new baseline after reviewing a change in quality; the gate
            does not fail it.
        ingest_run: The ingest flow run that started this evaluation (set by the trigger).
        table_access: For a table in a bucket: LanceDB storage options (endpoint, region) and
            a credentials block.
    """
    params = evaluate_params(
        dataset,
        table,
        gate=gate,
        options=options,
        query_embedder=query_embedder,
        accept=accept,
        ingest_run=ingest_run,
        table_access=table_access,
    )
    return evaluate_with(params)


def run_evaluate(params: EvaluateParams) -> dict[str, Any]:
    """Run the `evaluate` flow with one EvaluateParams (the CLI, tests, benchmarks)."""
    return evaluate(**evaluate_flow_parameters(params, secrets=True))


def evaluate_with(params: EvaluateParams) -> dict[str, Any]:
    logger = get_run_logger()
    store = open_store(params.store)
    query_set = load_queries(params)
    ev = score_table(params, store, query_set)
    ctx: Any = get_run_context()
    earlier = load_history(store, ev)
    baseline = baseline_results(earlier)
    problems = check_gate(params, ev, baseline)
    history = record_history(params, store, ev, not problems, str(ctx.flow_run.id))
    publish_results(params, ev, query_set, baseline, history, problems)
    summary = ev.summary()
    scored_tag = history[-1].get("tag") if history else None
    summary["tag"] = scored_tag
    good = last_good_tag(earlier)
    summary["gate"] = {
        "passed": not problems,
        "problems": problems,
        "accepted": params.accept,
        "last_good_tag": good,
    }
    summary["baseline"] = {
        mode: {
            "ndcg@10": row.get("ndcg_at_10"),
            "generation": row.get("generation"),
            "table_version": row.get("table_version"),
            "tag": row.get("tag"),
            "accepted": bool(row.get("accepted")),
        }
        for mode, row in baseline.items()
    }
    for mode, values in summary["results"].items():
        logger.info(
            "%s: ndcg@10 %.4f recall@100 %.4f",
            mode,
            values["ndcg@10"],
            values.get("recall@100", float("nan")),
        )
    if problems and params.accept:
        logger.warning("accepted as the new baseline despite: %s", "; ".join(problems))
    elif problems:
        if good:
            hint = (
                f"; the last good version is tag {good}: `lanceflow rollback --table "
                f"{params.store.uri} --to {good}` restores it"
            )
        else:
            hint = "; no earlier version passed this gate, so there is no good tag to restore"
        raise QualityGateError(
            "quality gate failed"
            + (f" for tag {scored_tag}" if scored_tag else "")
            + ": "
            + "; ".join(problems)
            + hint,
            summary,
        )
    return summary
