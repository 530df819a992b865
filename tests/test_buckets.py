"""Buckets as sources and homes, against a real S3-compatible server on loopback (moto's server
mode, tests/s3server.py) that counts the object GETs it serves.

The endpoint and credentials come from the standard variables (AWS_ENDPOINT_URL,
AWS_ALLOW_HTTP, AWS_ACCESS_KEY_ID, ...), as a user's would, unless a test gives them as
storage options or a Prefect credentials block.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.ingest import run_ingest
from tasks.report import IngestReport
from tasks.settings import IngestParams
from tasks.store import Store

from .conftest import REPO, SAMPLES, run_cli
from .s3server import S3Server

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.usefixtures("prefect_harness")]

KEY_ID = "lanceflow-test"
SECRET = "s3cr3t-value-that-must-never-leak"

#: a bucket laid out like a company share: nested prefixes, every format, Korean names
LAYOUT = {
    "handbook/guides/setup.md": "guides/setup.md",
    "handbook/guides/coffee.txt": "guides/coffee.txt",
    "handbook/guides/troubleshooting.md": "guides/troubleshooting.md",
    "handbook/policies/2026/vacation-policy.html": "reports/vacation-policy.html",
    "handbook/policies/2026/finance/expenses.pdf": "reports/expenses.pdf",
    "handbook/한국어/온보딩 안내.md": "ko/onboarding.md",
    "handbook/한국어/보안/보안 수칙.txt": "ko/security.txt",
    "handbook/한국어/재택 근무.docx": "ko/remote-work.docx",
}
RECORDS = {
    "handbook/records/faq.jsonl": "\n".join(
        json.dumps({"id": f"faq-{i}", "title": f"FAQ {i}", "text": text}, ensure_ascii=False)
        for i, text in enumerate(
            [
                "Expense reports are due by the fifth working day of the month.",
                "노트북 분실 시 즉시 보안팀에 신고하세요.",
                "The office is closed on public holidays.",
            ]
        )
    ).encode(),
    "handbook/records/glossary.csv": (
        "id,title,text\n"
        "g-1,SLA,A service level agreement states the uptime we promise.\n"
        'g-2,온콜,"당직 엔지니어는 장애 알림에 15분 안에 응답합니다."\n'
    ).encode(),
}
DOCUMENTS = len(LAYOUT) + 5  # eight files and five records


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The standard variables, as a user exports them for an S3-compatible store."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return s3


def _fs(s3: S3Server):
    import s3fs

    return s3fs.S3FileSystem(
        key=KEY_ID,
        secret=SECRET,
        endpoint_url=s3.endpoint,
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def _fill(fs, bucket: str) -> dict[str, bytes]:
    fs.mkdir(bucket)
    objects = {key: (SAMPLES / src).read_bytes() for key, src in LAYOUT.items()}
    objects.update(RECORDS)
    for key, data in objects.items():
        fs.pipe(f"{bucket}/{key}", data)
    return objects


def _run(uri: str, db: str, batch_docs: int = 256, **source: object) -> IngestReport:
    return run_ingest(
        IngestParams.model_validate(
            {
                "source": {"uri": uri, **source},
                "store": {"uri": db},
                "embedder": {"kind": "hash"},
                "batch_docs": batch_docs,
            }
        )
    )


def _counts(report: IngestReport) -> tuple[int, int, int, int, int]:
    d = report.documents
    return d.new, d.changed, d.unchanged, d.deleted, d.failed


def _doc_ids(db: str) -> set[str]:
    data = Store(db).documents().search().select(["doc_id", "status"]).limit(None).to_arrow()
    return {
        d
        for d, s in zip(
            data.column("doc_id").to_pylist(), data.column("status").to_pylist(), strict=True
        )
        if s == "ok"
    }


def test_a_bucket_behaves_like_a_folder_and_an_unchanged_night_downloads_nothing(
    aws_env: S3Server, tmp_path: Path
):
    s3, fs, db, uri = aws_env, _fs(aws_env), str(tmp_path / "db"), "s3://share/handbook/"
    objects = _fill(fs, "share")

    s3.reset()
    first = _run(uri, db, download_concurrency=3)
    assert _counts(first) == (DOCUMENTS, 0, 0, 0, 0), first.failures
    # every object downloaded exactly once
    assert dict(s3.object_gets) == {f"share/{k}": 1 for k in objects}
    ids = _doc_ids(db)
    assert {"한국어/온보딩 안내.md", "한국어/보안/보안 수칙.txt", "faq-1", "g-2"} <= ids
    assert "policies/2026/finance/expenses.pdf" in ids

    # a night with no change: listing only, not one object GET
    s3.reset()
    again = _run(uri, db)
    assert _counts(again) == (0, 0, DOCUMENTS, 0, 0)
    assert s3.gets == 0 and s3.counts["list"] >= 1
    assert again.chunks.embedded == 0

    # the whole bucket re-synced with the same bytes: every modification time is new, every
    # ETag the same (a single-part upload's ETag is its MD5): still nothing downloaded
    time.sleep(1.1)  # S3 times have one-second resolution
    before = {k: fs.info(f"share/{k}")["LastModified"] for k in objects}
    for key, data in objects.items():
        fs.pipe(f"share/{key}", data)
    assert all(fs.info(f"share/{k}")["LastModified"] != before[k] for k in objects)
    s3.reset()
    resynced = _run(uri, db)
    assert _counts(resynced) == (0, 0, DOCUMENTS, 0, 0)
    assert s3.gets == 0

    # one edit, one delete, one new object: exactly the two new contents are downloaded
    fs.pipe("share/handbook/guides/setup.md", b"# Setup\n\nInstall the VPN client first.\n")
    fs.rm("share/handbook/guides/coffee.txt")
    fs.pipe("share/handbook/새 폴더/bike.txt", "자전거 보관소는 지하 2층에 있습니다.".encode())
    s3.reset()
    changed = _run(uri, db)
    assert _counts(changed) == (1, 1, DOCUMENTS - 2, 1, 0)
    assert dict(s3.object_gets) == {
        "share/handbook/guides/setup.md": 1,
        "share/handbook/새 폴더/bike.txt": 1,
    }
    assert "guides/coffee.txt" not in _doc_ids(db)
    assert Store(db).chunks_table().count_rows("doc_id = 'guides/coffee.txt'") == 0


def test_a_listing_that_fails_part_way_deletes_nothing(aws_env: S3Server, tmp_path: Path):
    s3, fs, db, uri = aws_env, _fs(aws_env), str(tmp_path / "db"), "s3://partial/handbook"
    _fill(fs, "partial")
    assert _run(uri, db).documents.new == DOCUMENTS
    chunks_before = Store(db).chunks_table().count_rows()

    fs.rm("partial/handbook/guides/troubleshooting.md")
    s3.denied_prefixes.add("partial/handbook/한국어/")  # that prefix's listing is refused
    try:
        s3.reset()
        report = _run(uri, db)
    finally:
        s3.denied_prefixes.clear()
    assert not report.listing_complete
    assert any("한국어" in f.doc_id for f in report.listing_errors), report.listing_errors
    assert report.documents.deleted == 0 and report.documents.failed == 0
    assert s3.gets == 0
    # neither the deleted object's document nor the unlisted prefix's documents are gone
    ids = _doc_ids(db)
    assert "guides/troubleshooting.md" in ids and "한국어/온보딩 안내.md" in ids
    assert Store(db).chunks_table().count_rows() == chunks_before

    # once the listing is whole again, the deletion goes through
    healed = _run(uri, db)
    assert healed.listing_complete
    assert _counts(healed) == (0, 0, DOCUMENTS - 1, 1, 0)


def test_downloads_are_bounded_retried_and_sized_from_the_listing(
    aws_env: S3Server, tmp_path: Path
):
    s3, fs, db = aws_env, _fs(aws_env), str(tmp_path / "db")
    fs.mkdir("many")
    for i in range(24):
        text = f"Note {i}: the meeting room is on floor {i}."
        fs.pipe(f"many/docs/note-{i:02d}.txt", text.encode())
    fs.pipe("many/docs/huge.txt", b"x" * (3 * 2**20))
    fs.pipe("many/docs/empty.txt", b"")  # S3 answers 416 to any range on an empty object
    # the first two GETs of one object are refused with 503 SlowDown
    s3.slow_down["many/docs/note-07.txt"] = 2
    s3.get_delay = 0.05  # GETs overlap long enough to be counted in flight
    try:
        s3.reset()
        report = _run("s3://many/docs", db, download_concurrency=4, max_file_mb=1)
    finally:
        s3.get_delay = 0.0
    assert report.documents.new == 24
    # the object over max_file_mb is refused from its listed size, before any GET; the empty
    # one is read without one, and fails as an empty file
    failed = {f.doc_id: f.error for f in report.failures}
    assert failed.keys() == {"huge.txt", "empty.txt"}
    assert "max_file_mb" in failed["huge.txt"] and failed["empty.txt"] == "empty file"
    assert "many/docs/huge.txt" not in s3.object_gets
    assert "many/docs/empty.txt" not in s3.object_gets
    # the throttled object was retried until it came through
    assert s3.object_gets["many/docs/note-07.txt"] >= 3
    assert 2 <= s3.peak_in_flight <= 4


def test_a_table_in_the_bucket_is_written_searched_evaluated_and_maintained(
    aws_env: S3Server, tmp_path: Path
):
    from flows.evaluate import run_evaluate
    from flows.maintain import maintain
    from tasks.search import search
    from tasks.settings import MaintainSettings, evaluate_params

    s3, fs = aws_env, _fs(aws_env)
    fs.mkdir("docs")
    fs.mkdir("indexes")
    for path in SAMPLES.rglob("*"):
        if path.is_file():
            fs.pipe(f"docs/corpus/{path.relative_to(SAMPLES).as_posix()}", path.read_bytes())
    table = "s3://indexes/team/lancedb"
    first = _run("s3://docs/corpus", table)
    assert first.documents.new == 8 and first.documents.failed == 0
    assert first.tag

    store = Store(table)
    hits = search(store, "how many vacation days", mode="fts", k=3)
    assert hits and hits[0].doc_id == "reports/vacation-policy.html"
    assert fs.ls("indexes/team/lancedb")  # the table's files are in the bucket

    summary = run_evaluate(evaluate_params(str(REPO / "samples/eval/queries.jsonl"), table))
    assert summary["results"]["fts"]["ndcg@10"] > 0.5
    assert summary["tag"] == first.tag

    s3.reset()
    again = _run("s3://docs/corpus", table)
    assert again.documents.unchanged == 8
    # the table's own files are read; the documents are not
    assert not [k for k in s3.object_gets if k.startswith("docs/")]
    assert again.tag == first.tag  # nothing changed: the same version tag

    result = maintain(
        table=table, maintenance=MaintainSettings(retention_days=0, keep_tags=1, verify=False)
    )
    assert result["maintenance"]["tags_kept"] == [first.tag]
    assert search(Store(table), "비밀번호 변경 주기", mode="fts", k=3)


def test_cli_options_carry_the_endpoint_and_secrets_without_storing_them(
    s3: S3Server, cli_env: dict[str, str], tmp_path: Path
):
    """`--storage-option` and `--table-option` give everything, with no AWS variables set;
    the secret they carry is in no output, no table and no stored flow-run parameter."""
    fs = _fs(s3)
    fs.mkdir("cli-docs")
    fs.mkdir("cli-tables")
    for key, src in list(LAYOUT.items())[:4]:
        fs.pipe(f"cli-docs/{key}", (SAMPLES / src).read_bytes())
    env = {k: v for k, v in cli_env.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/x")
    table = "s3://cli-tables/idx"
    table_opts = [
        f"--table-option=aws_endpoint={s3.endpoint}",
        "--table-option=allow_http=true",
        "--table-option=aws_region=us-east-1",
        f"--table-option=aws_access_key_id={KEY_ID}",
        f"--table-option=aws_secret_access_key={SECRET}",
    ]
    proc = run_cli(
        env,
        "ingest",
        "s3://cli-docs/handbook",
        "--table",
        table,
        "--embedder",
        "hash",
        "--always-flow",
        "--json",
        f"--storage-option=endpoint_url={s3.endpoint}",
        f"--storage-option=key={KEY_ID}",
        f"--storage-option=secret={SECRET}",
        *table_opts,
    )
    report = json.loads(proc.stdout)
    assert report["documents"]["new"] == 4
    found = run_cli(env, "search", "coffee machine", "--table", table, "--json", *table_opts)
    assert json.loads(found.stdout)
    assert SECRET not in proc.stdout + proc.stderr + found.stdout + found.stderr

    # the flow run's stored parameters hold the options masked
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = [
            r
            for r in client.read_flow_runs(limit=200)
            if r.parameters.get("source") == "s3://cli-docs/handbook"
        ]
    assert len(runs) == 1
    params = json.dumps(runs[0].parameters)
    assert SECRET not in params and KEY_ID not in params
    assert runs[0].parameters["files"]["storage_options"]["secret"] == "**********"
    assert runs[0].parameters["table_access"]["storage_options"]["aws_secret_access_key"] == (
        "**********"
    )
    # nor is it in any table
    import lancedb

    db = lancedb.connect(
        table,
        storage_options={
            "aws_endpoint": s3.endpoint,
            "allow_http": "true",
            "aws_region": "us-east-1",
            "aws_access_key_id": KEY_ID,
            "aws_secret_access_key": SECRET,
        },
    )
    for name in db.list_tables().tables:
        assert SECRET not in str(db.open_table(name).to_arrow().to_pylist())


def test_credentials_from_a_prefect_block(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
):
    from prefect_aws import AwsClientParameters, AwsCredentials

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    AwsCredentials(
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3.endpoint),
    ).save("lanceflow-test-bucket", overwrite=True)
    fs = _fs(s3)
    fs.mkdir("blocked")
    fs.pipe("blocked/a/vpn.md", b"# VPN\n\nThe VPN client is required off-site.\n")
    table = "s3://blocked/index"
    report = run_ingest(
        IngestParams.model_validate(
            {
                "source": {"uri": "s3://blocked/a", "credentials_block": "lanceflow-test-bucket"},
                "store": {
                    "uri": table,
                    "access": {"credentials_block": "aws-credentials/lanceflow-test-bucket"},
                },
                "embedder": {"kind": "hash"},
            }
        )
    )
    assert report.documents.new == 1 and report.documents.failed == 0
    assert SECRET not in report.model_dump_json() and SECRET not in caplog.text

    from tasks.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="no Prefect block aws-credentials/nope"):
        _run("s3://blocked/a", str(tmp_path / "db"), credentials_block="nope")


def test_concurrent_commits_to_a_table_in_the_bucket_lose_nothing(aws_env: S3Server):
    """Lance commits a version with a create-only PUT (If-None-Match: *) and retries on a
    conflict: two writers appending at once to one table in the bucket lose no commit."""
    import threading

    import lancedb
    import pyarrow as pa

    from tasks.storage import lance_options

    _fs(aws_env).mkdir("commits")
    uri = "s3://commits/db"
    options = lance_options(uri, None)  # the endpoint from AWS_ENDPOINT_URL, as for a user
    schema = pa.schema([("writer", pa.int32()), ("batch", pa.int32())])
    lancedb.connect(uri, storage_options=options).create_table("t", schema=schema)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            tbl = lancedb.connect(uri, storage_options=options).open_table("t")
            for b in range(10):
                tbl.add(pa.table({"writer": [w] * 5, "batch": [b] * 5}, schema=schema))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    aws_env.reset()
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    tbl = lancedb.connect(uri, storage_options=options).open_table("t")
    assert tbl.count_rows() == 100
    assert len(tbl.list_versions()) == 21  # the empty table and 20 commits, none lost
    assert aws_env.counts["conditional_put"] >= 20


def test_an_s3_ddb_table_commits_every_version_through_dynamodb(aws_env: S3Server):
    """`s3+ddb://` (Lance's DynamoDB commit store, for stores without conditional PUT): the
    endpoint comes from AWS_ENDPOINT_URL as for S3, every version of the chunks table that a
    run commits (its data commit, index builds, compaction) is an item in the DynamoDB table,
    and a second run after an edit, and a search, work as on s3://."""
    from tasks.search import search
    from tasks.store import store_at

    s3, fs = aws_env, _fs(aws_env)
    ddb = s3.dynamodb_table("lance-commits", KEY_ID, SECRET)
    objects = _fill(fs, "ddb-docs")
    fs.mkdir("ddb-index")
    table = "s3+ddb://ddb-index/team?ddbTableName=lance-commits"

    def committed() -> dict[str, set[int]]:
        items = ddb.scan(TableName="lance-commits", ConsistentRead=True)["Items"]
        out: dict[str, set[int]] = {}
        for item in items:
            out.setdefault(item["base_uri"]["S"], set()).add(int(item["version"]["N"]))
        return out

    def chunk_versions() -> tuple[str, set[int]]:
        store = store_at(table)
        ds = store.chunks_table().to_lance()
        return store.chunks_name, {v["version"] for v in ds.versions()}

    # several batches: the refresh then compacts their fragments, a commit of its own
    first = _run("s3://ddb-docs/handbook/", table, batch_docs=4)
    assert _counts(first) == (DOCUMENTS, 0, 0, 0, 0), first.failures
    name, versions = chunk_versions()
    (base,) = [u for u in committed() if u.endswith(f"{name}.lance")]
    assert len(versions) > 2 and committed()[base] == versions

    fs.pipe(
        "ddb-docs/handbook/guides/coffee.txt",
        objects["handbook/guides/coffee.txt"] + b"\nDescale monthly.\n",
    )
    second = _run("s3://ddb-docs/handbook/", table)
    assert _counts(second) == (0, 1, DOCUMENTS - 1, 0, 0)
    _, after = chunk_versions()
    assert after > versions and committed()[base] == after
    assert search(store_at(table), "descale", mode="fts", k=3)[0].doc_id == "guides/coffee.txt"


@pytest.mark.parametrize("fault", ["missing", "wrong keys"])
def test_an_s3_ddb_table_without_its_commit_store_is_refused_before_any_write(
    aws_env: S3Server, fault: str
):
    """Lance reports a missing or mis-keyed commit store only at its first commit, as an
    opaque SDK error; the run refuses it before writing anything, saying how to create it."""
    from tasks.errors import LanceflowError

    s3, fs = aws_env, _fs(aws_env)
    name = f"commits-{fault.replace(' ', '-')}"
    if fault == "wrong keys":
        s3.dynamodb_table(name, KEY_ID, SECRET, keys=("path", "version"))
    fs.mkdir(f"ddb-{name}")
    fs.pipe(f"ddb-{name}/docs/a.md", b"# A\n\nOne document.\n")
    table = f"s3+ddb://ddb-{name}/index?ddbTableName={name}"
    with pytest.raises(LanceflowError) as err:
        _run(f"s3://ddb-{name}/docs/", table)
    message = str(err.value)
    assert name in message and "base_uri" in message and "create-table" in message
    assert SECRET not in message
    assert fs.ls(f"ddb-{name}") == [f"ddb-{name}/docs"]  # nothing written for the table
