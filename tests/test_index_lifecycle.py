"""A nightly reindex left alone: settings drift, generations and --reindex, deletions only
when the source really says so, --verify, and crash points that must converge to a clean build.

Flows run under the Prefect harness with the real bundled model; the crash tests run the CLI in
subprocesses (against the harness's server) that kill themselves with SIGKILL at named points.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from flows.ingest import run_ingest
from tasks.errors import DeletionRefusedError, IndexDriftError, SourceError
from tasks.search import search
from tasks.settings import IngestParams
from tasks.store import RUNS, Store

from .conftest import run_cli, table_snapshot

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _params(src, db, **kw) -> IngestParams:
    source = {"uri": str(src), **kw.pop("source", {})}
    return IngestParams.model_validate({"source": source, "store": {"uri": str(db)}, **kw})


def _versions(db) -> dict[str, int]:
    store = Store(str(db))
    return {name: int(store.table(name).version) for name in sorted(store.names())}


# ---- settings drift ------------------------------------------------------------------------


def test_changed_settings_are_refused_with_each_difference(corpus, tmp_path):
    db = tmp_path / "db"
    run_ingest(_params(corpus, db))
    before = _versions(db)
    with pytest.raises(IndexDriftError) as info:
        run_ingest(_params(corpus, db, chunking={"chunk_tokens": 32}))
    assert info.value.differences == [("chunk_tokens", 254, 32)]
    assert "--reindex" in str(info.value) and "254 -> 32" in str(info.value)
    with pytest.raises(IndexDriftError) as info:
        run_ingest(_params(corpus, db, embedder={"backend": "torch"}))
    names = {d[0] for d in info.value.differences}
    assert names == {"backend", "precision"}
    with pytest.raises(IndexDriftError) as info:
        run_ingest(_params(corpus, db, chunking={"strategy": "whole"}))
    assert ("chunking", "split", "whole") in info.value.differences
    assert _versions(db) == before  # refused runs write nothing
    # an alias of the same model is the same model
    same = run_ingest(_params(corpus, db, embedder={"model": "all-MiniLM-L6-v2"}))
    assert same.documents.unchanged == 8 and same.chunks.embedded == 0


def test_reindex_builds_beside_the_live_generation_and_switches(corpus, tmp_path):
    db = tmp_path / "db"
    first = run_ingest(_params(corpus, db))
    assert first.generation == 1
    rebuilt = run_ingest(_params(corpus, db, chunking={"chunk_tokens": 64}, reindex=True))
    assert rebuilt.generation == 2 and rebuilt.switched
    # a chunking-only change re-embeds only chunks whose text is new: the rest is cached
    assert rebuilt.chunks.cached >= 1
    assert rebuilt.chunks.embedded + rebuilt.chunks.cached == rebuilt.chunks.written
    store = Store(str(db))
    assert [(g.number, g.status) for g in store.generations()] == [(1, "retired"), (2, "live")]
    hits = search(store, "paid vacation days", k=1)
    assert hits[0].generation == 2 and hits[0].source == str(corpus.resolve())
    clean = tmp_path / "clean"
    run_ingest(_params(corpus, clean, chunking={"chunk_tokens": 64}))
    assert table_snapshot(str(db)) == table_snapshot(str(clean))
    # the next run with the new settings is a normal incremental run
    again = run_ingest(_params(corpus, db, chunking={"chunk_tokens": 64}))
    assert again.documents.unchanged == 8 and again.generation == 2 and not again.switched
    # retention: a third generation drops the first (keep_generations=1)
    run_ingest(_params(corpus, db, chunking={"chunk_tokens": 96}, reindex=True))
    assert [(g.number, g.status) for g in Store(str(db)).generations()] == [
        (2, "retired"),
        (3, "live"),
    ]
    assert "chunks" not in Store(str(db)).names()


def test_rollback_to_the_previous_generation(corpus, tmp_path, cli_env):
    db = str(tmp_path / "db")
    run_ingest(_params(corpus, db))
    run_ingest(_params(corpus, db, chunking={"chunk_tokens": 48}, reindex=True))
    out = run_cli(cli_env, "generations", "--table", db, "--activate", "1")
    assert "generation 1 is live" in out.stdout
    assert Store(db).generation.number == 1
    # the old settings are the live ones again
    assert run_ingest(_params(corpus, db)).documents.unchanged == 8


# ---- sources and deletions -----------------------------------------------------------------


def test_two_sources_in_one_table_each_deletes_only_its_own(corpus, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "parking.md").write_text("# Parking\n\nThe car park opens at seven.\n")
    (other / "bikes.md").write_text("# Bikes\n\nBike storage is in the basement.\n")
    (other / "lunch.md").write_text("# Lunch\n\nThe canteen serves lunch from noon.\n")
    db = tmp_path / "db"
    run_ingest(_params(corpus, db))
    second = run_ingest(_params(other, db))
    assert second.documents.new == 3 and second.documents.deleted == 0
    (other / "bikes.md").unlink()
    third = run_ingest(_params(other, db))
    assert third.documents.deleted == 1
    store = Store(str(db))
    assert store.sources() == sorted([str(corpus.resolve()), str(other.resolve())])
    # `corpus`, `./corpus/` and its absolute path are one source
    monkeypatch.chdir(tmp_path)
    again = run_ingest(_params("./corpus/", db))
    assert again.documents.unchanged == 8 and again.documents.new == 0
    assert again.source == str(corpus.resolve())
    runs = store.table(RUNS).search().limit(None).to_arrow().to_pylist()
    assert {r["source"] for r in runs} == {str(corpus.resolve()), str(other.resolve())}
    hit = search(store, "canteen lunch noon", mode="fts", k=1)[0]
    assert hit.source == str(other.resolve())


def test_an_emptied_or_vanished_source_is_refused_and_nothing_written(corpus, tmp_path):
    db = tmp_path / "db"
    run_ingest(_params(corpus, db))
    before = _versions(db)
    moved = tmp_path / "moved"
    shutil.move(corpus, moved)
    with pytest.raises(SourceError, match="cannot be opened"):
        run_ingest(_params(corpus, db))
    corpus.mkdir()  # a mount point left empty
    with pytest.raises(DeletionRefusedError, match="--max-delete-fraction 1"):
        run_ingest(_params(corpus, db))
    for sub in ("guides", "ko"):
        shutil.copytree(moved / sub, corpus / sub)  # 6 of 8: deleting 2 is allowed
    shutil.copytree(moved / "reports", tmp_path / "reports-away")
    # more than half gone: refused
    shutil.rmtree(corpus / "guides")
    with pytest.raises(DeletionRefusedError, match="would delete 5 of the 8"):
        run_ingest(_params(corpus, db))
    assert _versions(db) == before
    # confirmed deletions go through
    confirmed = run_ingest(_params(corpus, db, max_delete_fraction=1.0))
    assert confirmed.documents.deleted == 5


def test_an_incomplete_listing_deletes_nothing(corpus, tmp_path):
    db = tmp_path / "db"
    run_ingest(_params(corpus, db))
    (corpus / "guides" / "coffee.txt").unlink()
    os.symlink(tmp_path / "unmounted" / "notes.md", corpus / "guides" / "notes.md")
    report = run_ingest(_params(corpus, db))
    assert not report.listing_complete
    assert report.documents.deleted == 0
    assert any("broken symlink" in f.error for f in report.listing_errors)
    assert Store(str(db)).chunks_table().count_rows("doc_id = 'guides/coffee.txt'") > 0
    (corpus / "guides" / "notes.md").unlink()
    fixed = run_ingest(_params(corpus, db))
    # coffee.txt, and the broken link's own failed entry
    assert fixed.listing_complete and fixed.documents.deleted == 2
    assert Store(str(db)).chunks_table().count_rows("doc_id = 'guides/coffee.txt'") == 0


def test_links_outside_the_source_are_not_followed_unless_asked(corpus, tmp_path):
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "salaries.md").write_text("# Salaries\n\nNot for the index.\n")
    os.symlink(outside / "salaries.md", corpus / "guides" / "salaries.md")
    os.symlink(outside, corpus / "private")
    (corpus / "guides" / "alias.md").symlink_to(corpus / "guides" / "setup.md")  # inside: kept
    db = tmp_path / "db"
    report = run_ingest(_params(corpus, db))
    docs = Store(str(db)).document_ids()
    assert "guides/salaries.md" not in docs and "private/salaries.md" not in docs
    assert "guides/alias.md" in docs
    assert report.skipped_links == 2
    followed = run_ingest(_params(corpus, db, source={"follow_external_links": True}))
    assert followed.documents.new == 2


def test_verify_finds_an_edit_that_kept_size_and_time(corpus, tmp_path):
    db = tmp_path / "db"
    run_ingest(_params(corpus, db))
    path = corpus / "guides" / "coffee.txt"
    st = path.stat()
    text = path.read_text()
    edited = text.replace("a", "e", 3)
    assert len(edited) == len(text) and edited != text
    path.write_text(edited)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_ingest(_params(corpus, db)).documents.unchanged == 8  # invisible by size and time
    verified = run_ingest(_params(corpus, db, verify=True))
    assert verified.documents.changed == 1 and verified.documents.unchanged == 7
    assert verified.chunks.embedded >= 1
    hits = Store(str(db)).chunks_table().search().where("doc_id = 'guides/coffee.txt'")
    assert any(r["text"] in edited for r in hits.limit(None).to_arrow().to_pylist())


# ---- crash points: SIGKILL at each named point, then a re-run converges exactly ------------


def _crash(env, *args: str, point: str) -> None:
    proc = run_cli(dict(env, LANCEFLOW_CRASH_AT=point), *args, check=False)
    assert proc.returncode == -9, (
        f"expected a SIGKILL at {point}: {proc.returncode}\n" + (proc.stderr[-2000:])
    )


@pytest.mark.parametrize(
    ("point", "checkpoint"),
    [
        ("after-chunk-write:2", None),  # the run's one commit never happened
        ("after-chunk-commit", None),  # the one commit happened, the manifest rows did not
        ("after-chunk-commit:2", "0"),  # a commit per batch: two batches committed
        ("during-deletions", None),
        ("during-index-refresh", None),
    ],
)
def test_a_crash_at_each_point_converges_to_the_clean_build(
    corpus, tmp_path, cli_env, point, checkpoint
):
    db, clean = str(tmp_path / "db"), str(tmp_path / "clean")
    scratch = tmp_path / "tmp"  # the runs' temporary directory, to see what a crash leaves
    scratch.mkdir()
    cli_env = dict(cli_env, TMPDIR=str(scratch))
    args = ("--batch-docs", "2", "--json")
    if checkpoint is not None:
        args = ("--checkpoint-minutes", checkpoint, *args)
    if point == "during-deletions":
        run_cli(cli_env, "ingest", str(corpus), "--table", db, *args)
        for name in ("guides/coffee.txt", "ko/security.txt", "reports/expenses.pdf"):
            (corpus / name).unlink()
    _crash(cli_env, "ingest", str(corpus), "--table", db, *args, point=point)
    if point.startswith(("after-chunk-commit", "after-chunk-write")):
        # killed mid-pipeline: its spilled plan (and its written chunks' outcomes) are left
        assert len(list(scratch.glob("lanceflow-plan-*"))) == 1
        assert len(list(scratch.glob("lanceflow-commit-*"))) == 1
    if point == "after-chunk-write:2":  # two batches written, none visible
        assert Store(db).chunks_table().count_rows() == 0
    if point == "after-chunk-commit":  # every batch visible in one version
        assert Store(db).chunks_table().count_rows() > 0
    rerun = json.loads(run_cli(cli_env, "ingest", str(corpus), "--table", db, *args).stdout)
    assert rerun["documents"]["failed"] == 0
    assert list(scratch.glob("lanceflow-plan-*")) == []  # the next run swept it
    assert list(scratch.glob("lanceflow-commit-*")) == []
    run_cli(cli_env, "ingest", str(corpus), "--table", clean, *args)
    assert table_snapshot(db) == table_snapshot(clean)
    assert Store(db).indexes_current()


def test_chunks_committed_by_a_crashed_run_go_when_their_document_is_gone_or_now_fails(
    corpus, tmp_path, cli_env
):
    """A run killed after its commit and before its manifest rows leaves chunks that no
    manifest row owns. If their file is deleted, or no longer parses, before the next run,
    that run must still remove them: else they answer searches for ever."""
    db, clean = str(tmp_path / "db"), str(tmp_path / "clean")
    args = ("--batch-docs", "2", "--json")
    _crash(cli_env, "ingest", str(corpus), "--table", db, *args, point="after-chunk-commit")
    orphans = Store(db).chunks_table().count_rows()
    assert orphans > 0 and Store(db).documents().count_rows() == 0
    (corpus / "guides" / "coffee.txt").unlink()  # gone
    (corpus / "reports" / "expenses.pdf").write_bytes(b"%PDF-1.4 not a pdf any more")  # fails
    rerun = json.loads(run_cli(cli_env, "ingest", str(corpus), "--table", db, *args).stdout)
    assert rerun["documents"]["failed"] == 1
    assert rerun["chunks"]["deleted"] > 0  # the orphans' removal is counted
    run_cli(cli_env, "ingest", str(corpus), "--table", clean, *args, check=False)
    assert table_snapshot(db) == table_snapshot(clean)
    keys = set(
        Store(db)
        .chunks_table()
        .search()
        .select(["doc_id"])
        .limit(None)
        .to_arrow()
        .column("doc_id")
        .to_pylist()
    )
    assert "guides/coffee.txt" not in keys and "reports/expenses.pdf" not in keys


@pytest.mark.parametrize("point", ["after-chunk-commit:2", "before-switch", "after-switch"])
def test_a_crash_during_a_reindex_resumes_and_converges(corpus, tmp_path, cli_env, point):
    db, clean = str(tmp_path / "db"), str(tmp_path / "clean")
    run_cli(cli_env, "ingest", str(corpus), "--table", db, "--json")
    # a commit per batch: a crash keeps the batches committed before it
    new = ("--chunk-tokens", "40", "--batch-docs", "2", "--checkpoint-minutes", "0", "--json")
    _crash(cli_env, "ingest", str(corpus), "--table", db, *new, "--reindex", point=point)
    if point != "after-switch":
        # search keeps answering from the live generation while the rebuild is unfinished
        hits = json.loads(
            run_cli(cli_env, "search", "paid vacation days", "--table", db, "--json").stdout
        )
        assert hits[0]["generation"] == 1
        assert [g.status for g in Store(db).generations()] == ["live", "building"]
    resumed = json.loads(
        run_cli(cli_env, "ingest", str(corpus), "--table", db, *new, "--reindex").stdout
    )
    assert resumed["generation"] == 2
    if point == "after-chunk-commit:2":
        # the first two batches were committed: the resumed build skips their documents
        assert resumed["documents"]["unchanged"] >= 2 and resumed["switched"]
    run_cli(cli_env, "ingest", str(corpus), "--table", clean, *new)
    assert table_snapshot(db) == table_snapshot(clean)
    assert Store(db).generation.number == 2
