"""What a person reads after an evaluation: a metrics table, the change from the last run,
the worst queries, and a chart of the metric history."""

from __future__ import annotations

import base64
import io
from typing import Any

from tasks.evaluation import QuerySet
from tasks.scoring import Evaluation

TABLE_METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10", "map@10", "precision@1")


def metrics_table(ev: Evaluation) -> list[dict[str, Any]]:
    """Modes x metrics, for a Prefect table artifact."""
    rows = []
    for mode, res in ev.results.items():
        row: dict[str, Any] = {"mode": mode}
        for name in TABLE_METRICS:
            if name in res.metrics:
                row[name] = round(res.metrics[name], 4)
        rows.append(row)
    return rows


def changes_markdown(
    ev: Evaluation,
    previous: dict[str, dict[str, Any]],
    query_set: QuerySet,
    worst: int,
    problems: list[str],
) -> str:
    lines = [f"# Retrieval quality: {ev.dataset}", ""]
    lines.append(
        f"Table version {ev.table_version}, model `{ev.model}`, {ev.queries} judged queries."
    )
    if ev.unknown_documents or ev.unknown_queries:
        lines.append(
            f"\n**{ev.unknown_documents} judged document ids are not in the table** and "
            f"{ev.unknown_queries} qrels rows name unknown queries."
        )
    lines += ["", "## Change from the baseline (the last passed or accepted run)", ""]
    lines.append("| mode | ndcg@10 | baseline | change | baseline generation / version |")
    lines.append("| --- | --- | --- | --- | --- |")
    for mode, res in ev.results.items():
        now = res.metrics.get("ndcg@10", 0.0)
        prev = previous.get(mode)
        if prev is None or prev.get("ndcg_at_10") is None:
            lines.append(f"| {mode} | {now:.4f} | - | first run | - |")
        else:
            p = float(prev["ndcg_at_10"])
            gen = prev.get("generation") or 1
            lines.append(
                f"| {mode} | {now:.4f} | {p:.4f} | {now - p:+.4f} | "
                f"{gen} / {prev['table_version']} |"
            )
    lines += ["", "## Gate", ""]
    lines += [f"- FAILED: {p}" for p in problems] or ["- passed"]
    if worst:
        for mode, res in ev.results.items():
            lines += ["", f"## Worst queries ({mode})", ""]
            lines.append("| ndcg@10 | query | expected | ranked first |")
            lines.append("| --- | --- | --- | --- |")
            order = sorted(res.per_query, key=lambda q: (res.per_query[q].get("ndcg@10", 0.0), q))
            for qid in order[:worst]:
                expected = sorted(
                    query_set.qrels.get(qid, {}), key=lambda d: -query_set.qrels[qid][d]
                )
                top = res.top.get(qid) or []
                first = top[0][0] if top else "(nothing)"
                text = query_set.queries.get(qid, "").replace("|", "\\|")[:120]
                lines.append(
                    f"| {res.per_query[qid].get('ndcg@10', 0.0):.3f} | {text} | "
                    f"{', '.join(expected[:3])} | {first} |"
                )
    return "\n".join(lines) + "\n"


def history_chart_svg(history: list[dict[str, Any]], dataset: str) -> bytes:
    """A line chart of nDCG@10 per mode over the evaluation runs (SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    modes = sorted({r["mode"] for r in history})
    for mode in modes:
        rows = [r for r in history if r["mode"] == mode]
        ax.plot(
            [r["evaluated_at"] for r in rows],
            [r["ndcg_at_10"] for r in rows],
            marker="o",
            label=mode,
        )
    ax.set_title(f"nDCG@10 history: {dataset}")
    ax.set_ylabel("nDCG@10")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.autofmt_xdate()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def chart_markdown(svg: bytes, dataset: str, path: str | None) -> str:
    data = base64.b64encode(svg).decode()
    md = f"# nDCG@10 history: {dataset}\n\n![nDCG@10 history](data:image/svg+xml;base64,{data})\n"
    if path:
        md += f"\nThe chart is also saved at `{path}`.\n"
    return md
