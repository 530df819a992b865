"""The ingest flow under the Prefect test harness, with the real bundled model."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from flows.ingest import run_ingest
from tasks.errors import IndexDriftError, TooManyFailuresError
from tasks.settings import IngestParams
from tasks.store import CHUNKS, DOCUMENTS, RUNS, Store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _params(src, db, **kw) -> IngestParams:
    return IngestParams.model_validate(
        {"source": {"uri": str(src)}, "store": {"uri": str(db)}, **kw}
    )


def _vectors(store: Store) -> dict[str, np.ndarray]:
    data = store.table(CHUNKS).search().select(["chunk_id", "vector"]).limit(None).to_arrow()
    return {
        cid: np.asarray(v, dtype=np.float32)
        for cid, v in zip(
            data.column("chunk_id").to_pylist(), data.column("vector").to_pylist(), strict=True
        )
    }


def _docs(store: Store) -> dict[str, dict]:
    rows = store.table(DOCUMENTS).search().limit(None).to_arrow().to_pylist()
    return {r["doc_id"]: r for r in rows}


def test_first_run_ingests_every_format(corpus, tmp_path):
    report = run_ingest(_params(corpus, tmp_path / "db"))
    d = report.documents
    assert (d.seen, d.new, d.failed, d.unchanged) == (8, 8, 0, 0)
    assert report.chunks.embedded > 0 and report.chunks.written == report.chunks.embedded
    store = Store(str(tmp_path / "db"))
    tbl = store.table(CHUNKS)
    ids = tbl.search().select(["chunk_id"]).limit(None).to_arrow().column("chunk_id").to_pylist()
    assert len(ids) == len(set(ids)) == report.chunks.written
    assert store.table_model().model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert store.table_model().dimension == 384
    assert {"text_idx", "text_cjk_idx"} <= store.index_names()
    pdf_rows = tbl.search().where("doc_id = 'reports/expenses.pdf'").limit(None).to_arrow()
    assert min(pdf_rows.column("page_start").to_pylist()) == 1
    runs = store.table(RUNS).search().limit(None).to_arrow().to_pylist()
    assert len(runs) == 1 and runs[0]["documents_seen"] == 8
    # where the run's time went: the overlapped pipeline, then the index refresh that ends it
    assert report.stage_seconds["pipeline"] > 0 and report.stage_seconds["indexes"] > 0


def test_incremental_add_modify_delete_rename(corpus, tmp_path):
    db = tmp_path / "db"
    first = run_ingest(_params(corpus, db))
    store = Store(str(db))
    before = _vectors(store)
    untouched_ids = set(
        store.table(CHUNKS)
        .search()
        .where("doc_id = 'guides/coffee.txt'")
        .select(["chunk_id"])
        .limit(None)
        .to_arrow()
        .column("chunk_id")
        .to_pylist()
    )

    (corpus / "guides" / "new.md").write_text(
        "# Parking\n\nThe car park opens at seven and closes at midnight.", encoding="utf-8"
    )
    setup = corpus / "guides" / "setup.md"
    setup.write_text(setup.read_text() + "\n## Upgrading\n\nRun pip install -U lanceflow.\n")
    (corpus / "guides" / "troubleshooting.md").unlink()
    shutil.move(corpus / "ko" / "security.txt", corpus / "ko" / "security-rules.txt")
    # touched but unchanged: only its modification time moves
    os.utime(corpus / "reports" / "vacation-policy.html", (1e9, 1e9))

    second = run_ingest(_params(corpus, db))
    d = second.documents
    assert d.seen == 8
    assert d.new == 2  # new.md and the renamed file
    assert d.changed == 1  # setup.md
    assert d.deleted == 2  # troubleshooting.md and the old name of the renamed file
    assert d.unchanged == 5  # coffee, onboarding, remote-work, expenses, vacation (touched)
    assert d.failed == 0
    # the renamed file and setup.md's unchanged sections come from the cache
    assert second.chunks.cached >= 1
    assert second.chunks.embedded < first.chunks.embedded

    docs = _docs(store)
    assert "guides/troubleshooting.md" not in docs and "ko/security.txt" not in docs
    assert "ko/security-rules.txt" in docs
    after = _vectors(store)
    for cid in untouched_ids:
        np.testing.assert_array_equal(before[cid], after[cid])
    tbl = store.table(CHUNKS)
    assert tbl.count_rows("doc_id = 'guides/troubleshooting.md'") == 0
    assert tbl.count_rows("doc_id = 'ko/security.txt'") == 0
    assert tbl.count_rows() == sum(r["chunk_count"] for r in docs.values())

    third = run_ingest(_params(corpus, db))
    assert third.documents.unchanged == 8
    assert third.chunks.embedded == 0 and third.chunks.written == 0
    assert "indexes" not in third.stage_seconds  # nothing changed: no refresh to time


def test_bad_inputs_are_skipped_and_recorded(corpus, tmp_path):
    bad = corpus / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_bytes(b"")
    (bad / "binary.md").write_bytes(b"\x00\x01\x02\x03" * 200)
    (bad / "corrupt.pdf").write_bytes(b"%PDF-1.7\n garbage")
    (bad / "corrupt.docx").write_bytes(b"PK\x03\x04garbage")
    (bad / "big.txt").write_text("word " * 400_000)
    locked = bad / "locked.txt"
    locked.write_text("secret")
    locked.chmod(0)
    os.symlink(bad / "loop.txt", bad / "loop.txt")
    report = run_ingest(
        _params(corpus, tmp_path / "db", source={"uri": str(corpus), "max_file_mb": 1})
    )
    failed = {f.doc_id: f.error for f in report.failures}
    expected = {
        "bad/empty.txt": "empty",
        "bad/binary.md": "binary",
        "bad/corrupt.pdf": "PDF",
        "bad/corrupt.docx": "DOCX",
        "bad/big.txt": "max_file_mb",
        "bad/loop.txt": "symlink loop",
    }
    if os.geteuid() != 0:  # root reads any file
        expected["bad/locked.txt"] = "permission"
    for doc_id, reason in expected.items():
        assert reason in failed[doc_id], (doc_id, failed.get(doc_id))
    assert report.documents.new == 8 + (1 if os.geteuid() == 0 else 0)
    docs = _docs(Store(str(tmp_path / "db")))
    assert docs["bad/corrupt.pdf"]["status"] == "failed"
    assert "PDF" in docs["bad/corrupt.pdf"]["error"]


def test_run_fails_when_most_documents_fail(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("One readable document about vacation days.")
    for i in range(3):
        (src / f"bad{i}.pdf").write_bytes(b"not a pdf")
    with pytest.raises(TooManyFailuresError) as exc_info:
        run_ingest(_params(src, tmp_path / "db"))
    assert exc_info.value.report.documents.failed == 3
    # the good document is still written, and the run is on record
    store = Store(str(tmp_path / "db"))
    assert store.table(CHUNKS).count_rows("doc_id = 'good.txt'") == 1
    assert store.table(RUNS).search().limit(None).to_arrow().to_pylist()[0]["status"] == "failed"
    # a higher threshold lets the same corpus pass
    ok = run_ingest(_params(src, tmp_path / "db", max_failed_fraction=0.9))
    assert ok.status == "completed"


def test_another_model_is_refused_before_any_work(corpus, tmp_path):
    run_ingest(_params(corpus, tmp_path / "db"))
    with pytest.raises(IndexDriftError, match="all-MiniLM-L6-v2"):
        run_ingest(_params(corpus, tmp_path / "db", embedder={"kind": "hash"}))


def test_records_file_ingests_as_documents(tmp_path):
    from .conftest import synthetic_records, write_records

    src = tmp_path / "records"
    src.mkdir()
    write_records(src / "corpus.jsonl", synthetic_records(30))
    report = run_ingest(_params(src, tmp_path / "db"))
    assert report.documents.new == 30
    docs = _docs(Store(str(tmp_path / "db")))
    assert "doc-00007" in docs  # the records' own ids are the document ids
    again = run_ingest(_params(src, tmp_path / "db"))
    assert again.documents.unchanged == 30 and again.chunks.embedded == 0


def test_the_pipeline_runs_with_prompt_gil_handoffs_and_restores_the_interval(corpus, tmp_path):
    """The switch interval is process-wide: sampled from this thread while the flow runs in
    another, it is lowered during the run's pipeline and back to what it was afterwards."""
    import sys
    import threading
    import time

    from tasks.concurrency import PIPELINE_SWITCH_INTERVAL

    before = sys.getswitchinterval()
    assert before > PIPELINE_SWITCH_INTERVAL
    seen: set[float] = set()
    result: dict[str, object] = {}

    def ingest() -> None:
        try:
            result["report"] = run_ingest(_params(corpus, tmp_path / "db"))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            result["error"] = exc

    worker = threading.Thread(target=ingest)
    worker.start()
    while worker.is_alive():
        seen.add(sys.getswitchinterval())
        time.sleep(0.002)
    worker.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    assert result["report"].documents.new == 8  # type: ignore[attr-defined]
    assert PIPELINE_SWITCH_INTERVAL in seen
    assert sys.getswitchinterval() == before


def test_switch_interval_is_shared_by_concurrent_pipelines_and_never_raised():
    import sys

    from tasks.concurrency import prompt_gil_handoffs

    before = sys.getswitchinterval()
    first, second = prompt_gil_handoffs(0.001), prompt_gil_handoffs(0.002)
    first.__enter__()
    assert sys.getswitchinterval() == 0.001
    second.__enter__()  # a second run in the same process does not raise it
    assert sys.getswitchinterval() == 0.001
    first.__exit__(None, None, None)  # the other run still runs: still lowered
    assert sys.getswitchinterval() == 0.001
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_prefetch_grows_with_cores_up_to_eight():
    from flows.ingest import prefetch_batches

    assert [prefetch_batches(n) for n in (1, 2, 4, 6, 16, 64)] == [2, 2, 2, 3, 8, 8]


def test_on_many_cores_batches_are_chunked_in_parallel_into_the_same_table(
    corpus, tmp_path, monkeypatch
):
    """On a 16-core machine 8 batches are read, parsed and chunked at once (a GPU or an API
    embeds faster than one thread chunks); the table is the one a 2-core machine writes."""
    import threading
    import time

    import tasks.steps as steps

    one_doc = {"batch_docs": 1}  # 8 documents: 8 batches
    small = run_ingest(_params(corpus, tmp_path / "two", **one_doc))
    inner = steps.read_and_parse
    active, peak, lock = [0], [0], threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.2)  # long enough for every prefetched batch to be in flight at once
            return inner(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(steps, "read_and_parse", counted)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    big = run_ingest(_params(corpus, tmp_path / "sixteen", **one_doc))
    assert peak[0] > 2  # more than the 2 batches a small machine prefetches
    assert big.chunks.written == small.chunks.written
    two = _vectors(Store(str(tmp_path / "two")))
    sixteen = _vectors(Store(str(tmp_path / "sixteen")))
    assert two.keys() == sixteen.keys()
    assert all(np.array_equal(two[k], sixteen[k]) for k in two)


def test_prefect_does_not_walk_the_chunks_of_a_batch(tmp_path, monkeypatch):
    """A task's inputs are walked by Prefect (to find futures and states) unless quoted; a
    batch's outcomes hold every chunk, and walking them took most of the main thread's time
    once the model was fast (a GPU). The pipeline quotes them: the visits do not grow with
    the chunks in a batch."""
    import prefect.utilities.collections as collections

    inner = collections.visit_collection
    visits = [0]

    def counted(*args, **kwargs):
        visits[0] += 1  # the recursion goes through the module's name: every node counts
        return inner(*args, **kwargs)

    monkeypatch.setattr(collections, "visit_collection", counted)
    para = "A sentence about the index and its upkeep, long enough to fill a line. " * 12
    seen = []
    for docs in (10, 30):
        src = tmp_path / f"src{docs}"
        src.mkdir()
        for i in range(docs):
            (src / f"doc{i}.txt").write_text(f"Document {i}.\n\n" + "\n\n".join([para] * 40))
        visits[0] = 0
        params = _params(src, tmp_path / f"db{docs}", embedder={"kind": "hash"}, batch_docs=64)
        report = run_ingest(params)  # one batch
        seen.append((report.chunks.written, visits[0]))
    (small_chunks, small_visits), (big_chunks, big_visits) = seen
    assert big_chunks - small_chunks >= 800
    # quoted: fewer than one more visit per extra chunk (Prefect still links each document of
    # a task's returned list to its state); walked, as before, it was over 40
    assert big_visits - small_visits < big_chunks - small_chunks


def test_prefects_map_of_task_results_does_not_grow_with_the_documents(tmp_path, monkeypatch):
    """Prefect keeps, for the whole flow run, a map from each object a task returned (one
    level down) to the task's state. A batch's outcomes are returned wrapped, so that map
    grows with the batches, not with the documents: 8 times the documents in as many batches
    add nothing to it."""
    from prefect.context import FlowRunContext

    import flows.ingest as ingest_flow

    inner = ingest_flow.refresh_indexes
    sizes: list[int] = []

    def probe(*args, **kwargs):  # after the pipeline, in the flow run
        ctx = FlowRunContext.get()
        assert ctx is not None
        sizes.append(len(ctx.run_results))
        return inner(*args, **kwargs)

    monkeypatch.setattr(ingest_flow, "refresh_indexes", probe)
    for per_batch in (5, 40):
        src = tmp_path / f"src{per_batch}"
        src.mkdir()
        for i in range(10 * per_batch):  # 10 batches
            (src / f"doc{i}.txt").write_text(f"Document {i} of the batch test.")
        params = _params(
            src, tmp_path / f"db{per_batch}", embedder={"kind": "hash"}, batch_docs=per_batch
        )
        assert run_ingest(params).documents.new == 10 * per_batch
    small, big = sizes
    assert big - small < (400 - 50) / 10


def _row_count_changes(db) -> int:
    """Chunks-table versions whose row count differs from the version before (data commits;
    index builds, compaction and version cleanup change no count)."""
    ds = Store(str(db)).chunks_table().to_lance()
    counts = [ds.checkout_version(v["version"]).count_rows() for v in ds.versions()]
    return sum(1 for a, b in zip(counts, counts[1:], strict=False) if a != b)


def _many_docs(root, n: int) -> None:
    root.mkdir()
    for i in range(n):
        (root / f"doc{i:02d}.md").write_text(
            f"# Note {i}\n\nNote {i} is about topic {i * 7} and the weekly upkeep of index {i}.\n"
        )


def test_a_run_adds_one_table_version_however_many_batches_it_writes(tmp_path):
    """20 batches become visible in one commit; an edit run's replacements too. With
    checkpoint_minutes=0 every batch is a commit of its own (a crash keeps each)."""
    src = tmp_path / "src"
    _many_docs(src, 40)
    db = tmp_path / "db"
    first = run_ingest(_params(src, db, embedder={"kind": "hash"}, batch_docs=2))
    assert first.documents.new == 40 and first.chunks.written == 40
    assert _row_count_changes(db) == 1
    for i in (1, 15, 33):  # three batches' documents grow by a chunk
        with open(src / f"doc{i:02d}.md", "a") as fh:
            words = " ".join(f"term{i}x{j}" for j in range(600))  # past one chunk's tokens
            fh.write(f"\n\n# Appendix\n\n{words}.\n")
    second = run_ingest(_params(src, db, embedder={"kind": "hash"}, batch_docs=2))
    assert second.documents.changed == 3 and second.chunks.written >= 6
    assert _row_count_changes(db) == 2  # the first run's and this run's
    docs = _docs(Store(str(db)))
    assert all(docs[f"doc{i:02d}.md"]["chunk_count"] >= 2 for i in (1, 15, 33))

    per_batch = tmp_path / "per-batch"
    run_ingest(
        _params(src, per_batch, embedder={"kind": "hash"}, batch_docs=2, checkpoint_minutes=0)
    )
    assert _row_count_changes(per_batch) == 20
    from .conftest import table_snapshot

    assert table_snapshot(str(per_batch)) == table_snapshot(str(db))  # the same rows


def test_a_text_recurring_across_batches_is_embedded_once_before_the_commit(tmp_path, monkeypatch):
    """Until the run's commit, the table's cache cannot see the batches already written; the
    run keeps their vectors (bounded) so a recurring text (a footer, a disclaimer) is not sent
    to the model again: counted on the embedder's own call log."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"notice{i:02d}.txt").write_text("This message is confidential. Do not forward.\n")
    log = tmp_path / "calls.log"
    monkeypatch.setenv("LANCEFLOW_HASH_CALLS_LOG", str(log))
    report = run_ingest(_params(src, tmp_path / "db", embedder={"kind": "hash"}, batch_docs=1))
    embedded = sum(int(line.split()[1]) for line in log.read_text().splitlines() if line)
    assert report.chunks.written == 12
    assert embedded == report.chunks.embedded == 1
    assert report.chunks.cached == 11


def test_a_recurring_text_outlives_the_bound_on_written_vectors(tmp_path, monkeypatch):
    """The run's hold on written vectors is bounded (here by 3 of them, or twice a batch's new
    ones: 8): 36 vectors pass through it, yet the text that recurs in every batch is kept (it
    goes behind each batch's new ones) and embedded once."""
    import tasks.runs as runs

    monkeypatch.setattr(runs, "RECENT_VECTOR_MB", 3 * 256 * 4 / 2**20)  # 3 hash vectors
    src = tmp_path / "src"
    src.mkdir()
    for b in range(12):  # batches of 4: the notice and 3 documents of their own
        (src / f"b{b:02d}-a.txt").write_text("This message is confidential. Do not forward.\n")
        for j in range(3):
            (src / f"b{b:02d}-u{j}.txt").write_text(f"Batch {b} note {j} on item {b * 3 + j}.\n")
    log = tmp_path / "calls.log"
    monkeypatch.setenv("LANCEFLOW_HASH_CALLS_LOG", str(log))
    report = run_ingest(_params(src, tmp_path / "db", embedder={"kind": "hash"}, batch_docs=4))
    embedded = sum(int(line.split()[1]) for line in log.read_text().splitlines() if line)
    assert report.chunks.written == 48
    assert embedded == report.chunks.embedded == 1 + 36
