"""Retrieval metrics through pytrec_eval (trec_eval, as BEIR and MTEB use it).

Means are taken over every judged query: a query the system returned nothing for scores 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

Qrels = Mapping[str, Mapping[str, int]]
RunScores = Mapping[str, Mapping[str, float]]

DEFAULT_KS = (1, 3, 5, 10, 100)


def _truncate(run: RunScores, k: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for qid, docs in run.items():
        top = sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        out[qid] = dict(top)
    return out


def score_run(
    qrels: Qrels, run: RunScores, ks: Iterable[int] = DEFAULT_KS
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query ndcg@k, recall@k, precision@k, map@k and mrr@k for each k."""
    import pytrec_eval

    cuts = sorted({int(k) for k in ks})
    cut = ",".join(str(k) for k in cuts)
    judged = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items() if docs}
    run_f = {q: {d: float(s) for d, s in run.get(q, {}).items()} for q in judged}
    measures = {f"ndcg_cut.{cut}", f"recall.{cut}", f"P.{cut}", f"map_cut.{cut}"}
    per_query: dict[str, dict[str, float]] = {q: {} for q in judged}
    nonempty = {q: docs for q, docs in run_f.items() if docs}
    if nonempty:
        result = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(nonempty)
        for q, values in result.items():
            for name, value in values.items():
                base, _, kk = name.rpartition("_")
                label = {"ndcg_cut": "ndcg", "recall": "recall", "P": "precision", "map_cut": "map"}
                per_query[q][f"{label[base]}@{kk}"] = float(value)
        for k in cuts:
            rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(
                {q: d for q, d in _truncate(nonempty, k).items() if d}
            )
            for q, values in rr.items():
                per_query[q][f"mrr@{k}"] = float(values["recip_rank"])
    names = [f"{m}@{k}" for m in ("ndcg", "recall", "precision", "map", "mrr") for k in cuts]
    for q in judged:
        for name in names:
            per_query[q].setdefault(name, 0.0)
    n = len(judged) or 1
    means = {name: sum(per_query[q][name] for q in judged) / n for name in names}
    return means, per_query
