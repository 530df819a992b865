"""Ingesting from a bucket: moto's S3-compatible server on loopback, driven through s3fs."""

from __future__ import annotations

import pytest

from flows.ingest import run_ingest
from tasks.errors import SourceError
from tasks.settings import IngestParams
from tasks.store import CHUNKS, Store

from .conftest import SAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.usefixtures("prefect_harness")]

SECRET = "s3cr3t-value-that-must-never-leak"


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "lanceflow-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = f"http://{host}:{port}"
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("docs-bucket")
    for path in SAMPLES.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"docs-bucket/corpus/{path.relative_to(SAMPLES).as_posix()}")
    yield fs, endpoint
    server.stop()


def _params(uri: str, endpoint: str, db) -> IngestParams:
    return IngestParams.model_validate(
        {
            "source": {
                "uri": uri,
                "storage_options": {"client_kwargs": {"endpoint_url": endpoint}},
            },
            "store": {"uri": str(db)},
        }
    )


def test_bucket_ingest_incremental_and_failed_listing(s3, tmp_path, caplog):
    fs, endpoint = s3
    db = tmp_path / "db"
    first = run_ingest(_params("s3://docs-bucket/corpus", endpoint, db))
    assert first.documents.new == 8 and first.documents.failed == 0
    store = Store(str(db))
    docs = set(
        store.table("documents")
        .search()
        .select(["doc_id"])
        .limit(None)
        .to_arrow()
        .column("doc_id")
        .to_pylist()
    )
    assert "guides/setup.md" in docs and "ko/remote-work.docx" in docs

    fs.rm("docs-bucket/corpus/guides/coffee.txt")
    fs.pipe(
        "docs-bucket/corpus/guides/new.txt", b"Bike storage is in the basement, level minus two."
    )
    second = run_ingest(_params("s3://docs-bucket/corpus", endpoint, db))
    assert (second.documents.new, second.documents.deleted, second.documents.unchanged) == (1, 1, 7)
    assert store.table(CHUNKS).count_rows("doc_id = 'guides/coffee.txt'") == 0

    rows_before = store.table(CHUNKS).count_rows()
    with pytest.raises(SourceError):
        run_ingest(_params("s3://no-such-bucket/corpus", endpoint, db))
    assert store.table(CHUNKS).count_rows() == rows_before  # nothing deleted

    # the secret key appears nowhere: not in reports, tables or logs
    assert SECRET not in second.model_dump_json()
    assert SECRET not in caplog.text
    for name in ("chunks", "documents", "runs"):
        assert SECRET not in str(store.table(name).search().limit(None).to_arrow().to_pylist())
