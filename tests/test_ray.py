"""`--runner ray` on a real local Ray instance (one per test session: two CPUs, no dashboard,
started by the runner's own `connect`, as the CLI starts one), against the default runner on
the same corpus.

The hash embedder appends one line per model call to LANCEFLOW_HASH_CALLS_LOG, in whichever
process the call runs (a Ray actor included), so the tests count what was really embedded.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
import ray  # a dev dependency (the lanceflow[ray] extra): these tests never skip

from flows.ingest import run_ingest
from tasks import ray_runner
from tasks.settings import IngestParams
from tasks.store import Store

from .conftest import table_snapshot

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

_WORDS = (
    "river mountain table window garden lamp paper music coffee winter station bridge market "
    "harbor forest letter engine signal orbit canvas pepper violin ladder meadow thunder"
).split()

DOCS = 120
BATCH_DOCS = 15


#: set before the instance starts: its workers inherit it
MARK = "LANCEFLOW_TEST_RAY_MARK"


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    os.environ[MARK] = "started"
    # ray.init(num_cpus=2, include_dashboard=False, ...), as `lanceflow ingest --runner ray`
    ray_runner.connect(None, num_cpus=2)
    yield
    ray.shutdown()
    os.environ.pop(MARK, None)


@ray.remote(num_cpus=0.5)
def _pid_once_all_run(folder: str, n: int) -> int:
    """This worker's pid, returned once n of these tasks run at once (each leaves a file named
    for its pid and waits for n of them): n different processes, whatever their start-up."""
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(os.listdir(folder)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(os.listdir(folder))} of {n} tasks ran at once")
        time.sleep(0.05)
    return os.getpid()


def test_the_local_instance_keeps_idle_workers_for_the_next_shards(tmp_path):
    """Every task and actor holds at least half a CPU, so 2 CPUs run 4 at once: the instance
    connect() starts keeps 4 idle worker processes, and tasks after a pause run in the same
    processes. (Ray's default keeps one per CPU and stops the others a second after they went
    idle: the next tasks then start and import everything again.) First in the module, before
    other tests leave idle workers of their own."""

    def four_at_once(name: str) -> set[int]:
        folder = tmp_path / name
        folder.mkdir()
        return set(ray.get([_pid_once_all_run.remote(str(folder), 4) for _ in range(4)]))

    first = four_at_once("first")
    assert len(first) == 4
    time.sleep(3.0)  # Ray stops a worker idle for more than a second
    assert four_at_once("second") == first


def _worker_env_probe() -> tuple[str | None, str | None]:
    return os.environ.get(MARK), os.environ.get("LANCEFLOW_TEST_RAY_LATER")


def test_stages_run_in_the_instances_own_workers_until_a_variable_changes(monkeypatch):
    """A local instance's workers inherited the driver's variables: the pipeline's stages need
    no runtime env (which would start every worker a second time). A variable set after the
    start travels in the stages' runtime env, and the workers see it."""
    probe = ray.remote(_worker_env_probe)
    assert ray_runner.stage_runtime_env() is None
    assert ray.get(probe.remote()) == ("started", None)
    monkeypatch.setenv("LANCEFLOW_TEST_RAY_LATER", "later")
    env = ray_runner.stage_runtime_env()
    assert env is not None and env["env_vars"]["LANCEFLOW_TEST_RAY_LATER"] == "later"
    assert ray.get(probe.options(runtime_env=env).remote()) == ("started", "later")
    monkeypatch.delenv("LANCEFLOW_TEST_RAY_LATER")
    assert ray_runner.stage_runtime_env() is None


def _write_corpus(root: Path, n: int = DOCS, seed: int = 7) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        paras = [
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 90))) + "."
            for _ in range(rng.randint(2, 6))
        ]
        (root / f"doc{i:04d}.md").write_text(f"# Doc {i}\n\n" + "\n\n".join(paras) + "\n")
    return root


def _params(src: Path, db: Path, runner: str, **kw) -> IngestParams:
    return IngestParams.model_validate(
        {
            "source": {"uri": str(src)},
            "store": {"uri": str(db)},
            "embedder": {"kind": "hash"},
            "chunking": {"chunk_tokens": 48},
            "batch_docs": BATCH_DOCS,
            "runner": runner,
            "ray_workers": 2,
            **kw,
        }
    )


def _calls(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [tuple(map(int, line.split())) for line in log.read_text().split("\n") if line]  # type: ignore[misc]


def _chunk_versions(db: Path) -> list[tuple[int, int]]:
    """(version, rows) of every version of the chunks table."""
    tbl = Store(str(db)).chunks_table()
    ds = tbl.to_lance()
    return [(v["version"], ds.checkout_version(v["version"]).count_rows()) for v in ds.versions()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The corpus ingested by the default runner: what Ray must reproduce."""
    base = tmp_path_factory.mktemp("ray-ref")
    src = _write_corpus(base / "src")
    db = base / "db"
    report = run_ingest(_params(src, db, "local"))
    assert report.documents.failed == 0 and report.chunks.written > 100
    return src, table_snapshot(str(db)), report


def test_ray_writes_the_default_runners_table_in_one_commit(
    reference, tmp_path, monkeypatch, recwarn
):
    src, expected, ref_report = reference
    log = tmp_path / "calls.log"
    monkeypatch.setenv("LANCEFLOW_HASH_CALLS_LOG", str(log))
    db = tmp_path / "db"
    report = run_ingest(_params(src, db, "ray"))
    # Ray Data's deprecation of the actors' restart settings (no named parameter in the
    # pinned Ray) is not repeated to the user on every run
    assert not [w for w in recwarn if "ray_remote_args" in str(w.message)]
    assert report.documents.new == DOCS and report.documents.failed == 0
    assert report.chunks.written == ref_report.chunks.written
    # chunk ids, texts and vectors bit for bit, and the same manifest
    assert table_snapshot(str(db)) == expected
    # the data arrived in ONE table version: the one before it is the empty table
    versions = _chunk_versions(db)
    with_data = [v for v, rows in versions if rows]
    first = with_data[0]
    assert dict(versions)[first] == report.chunks.written
    assert dict(versions)[first - 1] == 0
    # every chunk was embedded once, by Ray workers (not by this process)
    calls = _calls(log)
    assert sum(n for _, n in calls) == report.chunks.embedded == report.chunks.written
    import os

    assert os.getpid() not in {pid for pid, _ in calls}
    # a second run finds nothing to do
    again = run_ingest(_params(src, db, "ray"))
    assert again.documents.unchanged == DOCS and again.chunks.embedded == 0


def test_ray_writes_an_s3_ddb_table_in_one_commit_through_dynamodb(
    reference, tmp_path, monkeypatch
):
    """`s3+ddb://` on Ray: the workers write the data files into the bucket and the driver
    commits once, through Lance's DynamoDB commit store (moto's, on loopback). The workers were
    started before any AWS setting existed: the table's options (endpoints, keys) resolved on
    the driver travel inside the job. The table is the default runner's, bit for bit, and its
    every version is an item in the DynamoDB table."""
    import s3fs

    from tasks.store import store_at

    from .s3server import S3Server

    src, expected, ref_report = reference
    key_id, secret = "ray-test", "r4y-s3cret-never-shown"
    s3 = S3Server().start()
    try:
        for name, value in {
            "AWS_ACCESS_KEY_ID": key_id,  # this process's own reads (the snapshot below)
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": s3.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }.items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT"):
            monkeypatch.delenv(name, raising=False)
        ddb = s3.dynamodb_table("ray-commits", key_id, secret)
        s3fs.S3FileSystem(key=key_id, secret=secret, endpoint_url=s3.endpoint).mkdir("ray-index")
        table = "s3+ddb://ray-index/t?ddbTableName=ray-commits"
        keys = {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
        store = {"uri": table, "access": {"storage_options": keys}}
        report = run_ingest(_params(src, tmp_path, "ray", store=store))
        assert report.documents.new == DOCS and report.documents.failed == 0
        assert report.chunks.written == ref_report.chunks.written
        assert secret not in report.model_dump_json()
        assert table_snapshot(table) == expected
        tbl = store_at(table).chunks_table()
        ds = tbl.to_lance()
        rows = [
            (v["version"], ds.checkout_version(v["version"]).count_rows()) for v in ds.versions()
        ]
        assert [v for v, n in rows if n][0] - 1 == [v for v, n in rows if not n][-1]  # one commit
        items = ddb.scan(TableName="ray-commits", ConsistentRead=True)["Items"]
        committed = {
            int(i["version"]["N"])
            for i in items
            if i["base_uri"]["S"].endswith(f"{tbl.name}.lance")
        }
        assert committed == {v for v, _ in rows}
    finally:
        s3.stop()


@pytest.mark.parametrize("early", [True, False], ids=["started-early", "started-by-the-step"])
def test_a_run_that_starts_ray_stops_it_and_its_workers_before_the_commit(
    reference, tmp_path, monkeypatch, early
):
    """No connection before the run. The local instance the run starts, and with it every
    worker process (each actor's model, the heaps the pipeline grew), is gone before the
    commit and the index refresh, not held to the end of the process. Either the CLI's way
    (start_early() before the flow, in a thread that must outlive the instance: Ray's
    processes die with the thread that started them), or a deployment's (the step starts
    it)."""
    import psutil

    src, expected, _ = reference
    log = tmp_path / "calls.log"
    monkeypatch.setenv("LANCEFLOW_HASH_CALLS_LOG", str(log))
    ray.shutdown()  # the module's connection: this run must open (and close) its own
    try:
        params = _params(src, tmp_path / "db", "ray", ray_cpus=2)
        if early:
            ray_runner.start_early(params.ray_address, params.ray_cpus, params.ray_memory)
            assert _ray_start_threads()
        report = run_ingest(params)
        ray_runner.stop_early()  # as the CLI does: nothing left to stop
        assert not ray.is_initialized()
        deadline = time.monotonic() + 10
        while _ray_start_threads():
            assert time.monotonic() < deadline, "the early start's thread outlived the run"
            time.sleep(0.1)
        assert {"ray_start", "pipeline", "ray_stop", "commit"} <= set(report.stage_seconds)
        workers = {pid for pid, _ in _calls(log)}
        assert workers and os.getpid() not in workers
        deadline = time.monotonic() + 30
        while alive := [p for p in workers if psutil.pid_exists(p)]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not alive, f"Ray worker processes {alive} outlived the run's Ray session"
        assert table_snapshot(str(tmp_path / "db")) == expected
    finally:
        monkeypatch.undo()  # the module's instance: its workers must not inherit this test's log
        ray_runner.connect(None, num_cpus=2)


def _ray_start_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ray-start"]


def test_an_early_start_no_step_used_is_stopped_and_one_that_failed_fails_the_step():
    """The CLI starts Ray before the flow; a run with nothing for Ray to do (deletions only)
    must not leave that instance running, and an instance that could not start fails the
    step that needs it, with the connection error, not a hang."""
    ray.shutdown()
    try:
        ray_runner.start_early(None, 2, 256)
        ray_runner.stop_early()
        assert not ray.is_initialized()
        deadline = time.monotonic() + 10
        while _ray_start_threads():
            assert time.monotonic() < deadline, "the early start's thread outlived stop_early"
            time.sleep(0.1)
        # a local instance Ray refuses to start (fast, unlike an address nothing answers at)
        ray_runner.start_early(None, -1, 256)
        with pytest.raises(ray_runner.RayRunnerError, match="must be nonnegative"):
            with ray_runner.ray_session(None, -1, 256):
                pass
        assert not ray.is_initialized() and not _ray_start_threads()
    finally:
        ray_runner.connect(None, num_cpus=2)


def test_a_killed_ray_worker_costs_at_most_one_shard(reference, tmp_path, monkeypatch):
    src, expected, ref_report = reference
    log = tmp_path / "calls.log"
    monkeypatch.setenv("LANCEFLOW_HASH_CALLS_LOG", str(log))
    # the first embedding actor to finish its second shard is killed (SIGKILL) before it
    # returns it; Ray restarts the actor and runs that shard again
    monkeypatch.setenv("LANCEFLOW_CRASH_AT", "ray-embed:2")
    marker = tmp_path / "crashed"
    monkeypatch.setenv("LANCEFLOW_CRASH_MARKER", str(marker))
    db = tmp_path / "db"
    report = run_ingest(_params(src, db, "ray"))
    assert marker.exists(), "no worker was killed: the test proves nothing"
    assert table_snapshot(str(db)) == expected
    calls = _calls(log)
    embedded = sum(n for _, n in calls)
    killed_pid = {pid for pid, _ in calls} - {pid for pid, _ in calls[-1:]}
    assert killed_pid  # calls came from more than one actor process
    total = ref_report.chunks.written
    # the killed actor's shard was embedded twice; nothing else was
    assert total < embedded <= total + max(n for _, n in calls)
    assert report.chunks.written == total


def test_after_editing_one_percent_only_changed_chunks_are_embedded(tmp_path, monkeypatch):
    src = _write_corpus(tmp_path / "src", n=200, seed=11)
    db = tmp_path / "db"
    first = run_ingest(_params(src, db, "ray"))
    assert first.documents.new == 200
    before = {r["text_hash"] for r in _rows(db)}
    # 1 % of the documents: a paragraph replaced in each of two
    rng = random.Random(3)
    for name in ("doc0013.md", "doc0150.md"):
        path = src / name
        paras = path.read_text().split("\n\n")
        paras[1] = " ".join(rng.choice(_WORDS) for _ in range(60)) + " edited."
        path.write_text("\n\n".join(paras))
    log = tmp_path / "calls.log"
    monkeypatch.setenv("LANCEFLOW_HASH_CALLS_LOG", str(log))
    second = run_ingest(_params(src, db, "ray"))
    assert second.documents.changed == 2 and second.documents.unchanged == 198
    after = {r["text_hash"] for r in _rows(db)}
    new_texts = after - before
    assert new_texts and sum(n for _, n in _calls(log)) == len(new_texts)
    assert second.chunks.embedded == len(new_texts)
    # the same table as a clean default-runner build of the edited corpus
    clean = tmp_path / "clean"
    run_ingest(_params(src, clean, "local"))
    assert table_snapshot(str(db)) == table_snapshot(str(clean))


def _rows(db: Path) -> list[dict]:
    tbl = Store(str(db)).chunks_table()
    return tbl.search().select(["chunk_id", "text_hash"]).limit(None).to_arrow().to_pylist()


def test_a_table_written_by_pylance_is_read_searched_and_appended_by_lancedb(tmp_path):
    """The pinned pylance (the Ray runner's writer) and lancedb share one format."""
    import lance
    import lancedb
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((64, 8)).astype(np.float32)
    data = pa.table(
        {
            "id": pa.array([f"r{i}" for i in range(64)]),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 8),
        }
    )
    lance.write_dataset(data, str(tmp_path / "t.lance"))
    db = lancedb.connect(str(tmp_path))
    tbl = db.open_table("t")
    assert tbl.count_rows() == 64
    hit = tbl.search(vecs[5]).limit(1).to_list()[0]
    assert hit["id"] == "r5"
    tbl.add(data.slice(0, 4).set_column(0, "id", pa.array(["n0", "n1", "n2", "n3"])))
    back = lance.dataset(str(tmp_path / "t.lance"))
    assert back.count_rows() == 68
    assert set(back.to_table(filter="id LIKE 'n%'").column("id").to_pylist()) == {
        "n0",
        "n1",
        "n2",
        "n3",
    }


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_a_reindex_that_changes_only_the_embedding_backfills_from_stored_text(
    tmp_path, monkeypatch, runner
):
    """256 -> 128 dimensions: the chunks are the same, so the new generation is the live one
    re-embedded from its stored text (no document read again), and equals a clean build."""
    src = _write_corpus(tmp_path / "src", n=40, seed=5)
    db = tmp_path / "db"
    first = run_ingest(_params(src, db, runner, embedder={"kind": "hash", "dimensions": 256}))
    # one document changed since the live build: it alone is read, parsed and chunked
    (src / "doc0007.md").write_text("# Doc 7\n\nrewritten from scratch, a new paragraph.\n")
    log = tmp_path / "calls.log"
    monkeypatch.setenv("LANCEFLOW_HASH_CALLS_LOG", str(log))
    new = _params(src, db, runner, embedder={"kind": "hash", "dimensions": 128}, reindex=True)
    report = run_ingest(new)
    assert report.switched and report.generation == 2
    assert report.backfilled > 0
    assert report.documents.changed == 1 and report.documents.unchanged == 39
    # each chunk text of the live generation was embedded once, the edit's new chunks once
    # more; nothing else
    texts_embedded = sum(n for _, n in _calls(log))
    if runner == "local":
        assert texts_embedded == report.chunks.embedded
    else:  # Ray's workers report rows; a text repeated within a batch is sent once
        assert 0 <= report.chunks.embedded - texts_embedded <= report.chunks.embedded // 100
    assert report.backfilled <= first.chunks.embedded + first.chunks.cached
    assert texts_embedded - report.backfilled <= report.chunks.written
    clean = tmp_path / "clean"
    run_ingest(_params(src, clean, "local", embedder={"kind": "hash", "dimensions": 128}))
    assert table_snapshot(str(db)) == table_snapshot(str(clean))
    store = Store(str(db))
    assert store.table_model().dimension == 128
    hits = store.chunks_table().search([0.0] * 127 + [1.0]).limit(3).to_list()
    assert len(hits) == 3
