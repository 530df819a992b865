"""The `evaluate` flow: score retrieval quality, compare with the last run, gate on it."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context

from tasks.errors import LanceflowError
from tasks.eval_steps import (
    check_gate,
    load_history,
    load_queries,
    publish_results,
    record_history,
    score_table,
)
from tasks.scoring import baseline_results
from tasks.settings import EvaluateParams
from tasks.store import Store


class QualityGateError(LanceflowError):
    """Retrieval quality broke the configured gate."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@flow(name="evaluate", persist_result=False, validate_parameters=True)
def evaluate(params: EvaluateParams) -> dict[str, Any]:
    """Score the table on a labelled query set in every mode and fail when quality drops."""
    logger = get_run_logger()
    store = Store(params.store.uri)
    query_set = load_queries(params)
    ev = score_table(params, store, query_set)
    ctx: Any = get_run_context()
    baseline = baseline_results(load_history(store, ev))
    problems = check_gate(params, ev, baseline)
    history = record_history(params, store, ev, not problems, str(ctx.flow_run.id))
    publish_results(params, ev, query_set, baseline, history, problems)
    summary = ev.summary()
    summary["gate"] = {"passed": not problems, "problems": problems, "accepted": params.accept}
    summary["baseline"] = {
        mode: {
            "ndcg@10": row.get("ndcg_at_10"),
            "generation": row.get("generation"),
            "table_version": row.get("table_version"),
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
        raise QualityGateError("quality gate failed: " + "; ".join(problems), summary)
    return summary
