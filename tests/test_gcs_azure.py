"""gs:// and az:// sources (and an az:// table) against real emulators on loopback
(tests/emulators.py): gcp-storage-emulator through gcsfs, Azurite through adlfs and LanceDB.

LanceDB cannot keep a table in gcp-storage-emulator (it lacks the XML API Lance's object store
speaks), so the GCS table path is not covered here; GCS sources are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flows.ingest import run_ingest
from tasks.report import IngestReport
from tasks.settings import IngestParams
from tasks.store import Store, store_at

from .conftest import SAMPLES
from .emulators import azurite, gcs_server  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.usefixtures("prefect_harness")]

FILES = {
    "docs/guides/setup.md": "guides/setup.md",
    "docs/guides/coffee.txt": "guides/coffee.txt",
    "docs/reports/vacation-policy.html": "reports/vacation-policy.html",
    "docs/reports/q3/expenses.pdf": "reports/expenses.pdf",
    "docs/한국어/보안 수칙.txt": "ko/security.txt",
    "docs/한국어/재택 근무.docx": "ko/remote-work.docx",
}


def _upload(fs: Any, root: str) -> dict[str, bytes]:
    objects = {f"{root}/{key}": (SAMPLES / src).read_bytes() for key, src in FILES.items()}
    for path, data in objects.items():
        fs.pipe(path, data)
    return objects


def _ingest(uri: str, options: dict[str, Any], table: str, **access: Any) -> IngestReport:
    return run_ingest(
        IngestParams.model_validate(
            {
                "source": {"uri": uri, "storage_options": options},
                "store": {"uri": table, "access": access},
                "embedder": {"kind": "hash"},
            }
        )
    )


def _counts(r: IngestReport) -> tuple[int, int, int, int, int]:
    d = r.documents
    return d.new, d.changed, d.unchanged, d.deleted, d.failed


def _lifecycle(
    server: Any, fs: Any, bucket: str, uri: str, options: dict[str, Any], table: str, **access
) -> None:
    """First run, no-change night, identical re-sync, edit + delete: counted at the server."""
    objects = _upload(fs, bucket)
    n = len(objects)
    server.reset_counts()
    first = _ingest(uri, options, table, **access)
    assert _counts(first) == (n, 0, 0, 0, 0), first.failures
    assert server.object_gets(prefix=bucket) >= n

    server.reset_counts()
    assert _counts(_ingest(uri, options, table, **access)) == (0, 0, n, 0, 0)
    assert server.object_gets(prefix=bucket) == 0

    for path, data in objects.items():  # re-synced with the same bytes: new times
        fs.pipe(path, data)
    server.reset_counts()
    assert _counts(_ingest(uri, options, table, **access)) == (0, 0, n, 0, 0)
    assert server.object_gets(prefix=bucket) == 0

    fs.pipe(f"{bucket}/docs/guides/setup.md", b"# Setup\n\nAsk IT for a laptop first.\n")
    fs.rm(f"{bucket}/docs/guides/coffee.txt")
    server.reset_counts()
    assert _counts(_ingest(uri, options, table, **access)) == (0, 1, n - 2, 1, 0)
    gets = server.requests("get", prefix=bucket)
    assert {r.path.rsplit("/", 1)[-1] for r in gets} == {"setup.md"}


def test_a_gcs_bucket_source(gcs_server, tmp_path: Path):  # noqa: F811
    fs = gcs_server.fs()
    gcs_server.make_bucket("gcs-docs")
    _lifecycle(
        gcs_server,
        fs,
        "gcs-docs",
        "gs://gcs-docs/docs",
        gcs_server.storage_options,
        str(tmp_path / "db"),
    )
    ids = {r["doc_id"] for r in Store(str(tmp_path / "db")).documents().search().limit(None)
           .to_arrow().to_pylist()}  # fmt: skip
    assert "한국어/보안 수칙.txt" in ids and "reports/q3/expenses.pdf" in ids


def test_an_azure_container_source_and_table(azurite, tmp_path: Path):  # noqa: F811
    from tasks.search import search

    azurite.make_container("az-docs")
    azurite.make_container("az-tables")
    table = "az://az-tables/team/lancedb"
    access = {"storage_options": azurite.lance_storage_options}
    _lifecycle(
        azurite,
        azurite.fs(),
        "az-docs",
        "az://az-docs/docs",
        azurite.storage_options,
        table,
        **access,
    )
    from tasks.settings import TableAccess

    store = store_at(table, TableAccess(**access))
    hits = search(store, "paid vacation days", mode="fts", k=3)
    assert hits and hits[0].doc_id == "reports/vacation-policy.html"
    assert azurite.fs().ls("az-tables/team/lancedb")


def test_azure_credentials_from_a_prefect_block(azurite, tmp_path: Path):  # noqa: F811
    """A block of type azure-blob-storage-credentials (prefect-azure's slug and fields, here
    declared by the test since prefect-azure is not installed) serves source and table."""
    from prefect.blocks.core import Block
    from pydantic import SecretStr

    class AzureBlobStorageCredentials(Block):
        _block_type_slug = "azure-blob-storage-credentials"
        connection_string: SecretStr | None = None
        account_url: str | None = None

    AzureBlobStorageCredentials(connection_string=SecretStr(azurite.connection_string)).save(
        "lanceflow-azurite", overwrite=True
    )
    azurite.make_container("az-block")
    fs = azurite.fs()
    fs.pipe("az-block/in/note.md", "# 공지\n\n보안 교육은 매년 3월에 진행됩니다.".encode())
    report = run_ingest(
        IngestParams.model_validate(
            {
                "source": {"uri": "az://az-block/in", "credentials_block": "lanceflow-azurite"},
                "store": {
                    "uri": "az://az-block/index",
                    "access": {"credentials_block": "lanceflow-azurite"},
                },
                "embedder": {"kind": "hash"},
            }
        )
    )
    assert report.documents.new == 1 and report.documents.failed == 0
    assert azurite.account_key not in report.model_dump_json()
    assert fs.ls("az-block/index")
