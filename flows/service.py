"""`lanceflow serve`: the nightly ingest, the evaluation after every completed ingest and the
weekly maintenance, served from one process with Prefect's `serve` (no work pool, no worker).

The same three schedules and the trigger are declared for workers in deployments/prefect.yaml;
`AFTER_INGEST` is the trigger both use.
"""

from __future__ import annotations

from typing import Any

#: start an evaluation whenever an `ingest` flow run completes, on the table that run wrote
AFTER_INGEST: dict[str, Any] = {
    "type": "event",
    "enabled": True,
    "match": {"prefect.resource.id": "prefect.flow-run.*"},
    "match_related": {"prefect.resource.role": "flow", "prefect.resource.name": "ingest"},
    "expect": ["prefect.flow-run.Completed"],
    "parameters": {
        "table": "{{ flow_run.parameters['table'] }}",
        "ingest_run": "{{ event.resource.id }}",
    },
}


def serve_deployments(
    source: str,
    table: str,
    dataset: str | None,
    cron: str = "0 2 * * *",
    timezone: str = "UTC",
    maintain_cron: str = "0 4 * * 0",
    files: dict[str, Any] | None = None,
    table_access: dict[str, Any] | None = None,
) -> list[Any]:
    """The deployments `lanceflow serve` runs: ingest/nightly (and ingest/manual), evaluate/
    after-ingest when a dataset is given, maintain/weekly.

    `files` and `table_access` (the source's and the table's storage options and credentials
    blocks) become every deployment's default parameters, so the evaluation the trigger starts
    reaches the same table. A secret among them is stored masked, and runs then fail naming
    a credentials block or the worker's environment instead."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    from flows.evaluate import evaluate
    from flows.ingest import ingest
    from flows.maintain import maintain

    access = {"table_access": table_access} if table_access else {}
    with_files = {**access, **({"files": files} if files else {})}
    found: list[Any] = [
        ingest.to_deployment(
            name="nightly",
            schedules=[Cron(cron, timezone=timezone)],
            parameters={"source": source, "table": table, **with_files},
            description="Bring the index up to date with the source every night.",
        ),
        ingest.to_deployment(
            name="manual",
            parameters={"source": source, "table": table, **with_files},
            description="Start an ingest by hand; every parameter can be changed in the form.",
        ),
        maintain.to_deployment(
            name="weekly",
            schedules=[Cron(maintain_cron, timezone=timezone)],
            parameters={"source": source, "table": table, **with_files},
            description="Verify against the source, compact, prune old versions.",
        ),
    ]
    if dataset:
        found.append(
            evaluate.to_deployment(
                name="after-ingest",
                parameters={"dataset": dataset, "table": table, **access},
                triggers=[DeploymentEventTrigger(**AFTER_INGEST)],
                description="Score retrieval quality after every completed ingest.",
            )
        )
    return found


def serve_all(*args: Any, limit: int | None = None, **kwargs: Any) -> None:
    """Serve `serve_deployments(*args, **kwargs)` from this process until it is stopped."""
    from prefect import serve

    serve(*serve_deployments(*args, **kwargs), limit=limit)
