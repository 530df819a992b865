"""Pure units: listing, globs, records and the ids and hashes derived from them."""

from __future__ import annotations

import json
import os

import pytest

from tasks.errors import SourceError
from tasks.identity import chunk_id, content_hash, text_hash
from tasks.settings import SourceSettings
from tasks.sources import Record, RecordError, Source, selected


def _ids(source: Source) -> list[str]:
    return [e.rel for e in source.iter_entries()]


def test_document_ids_are_paths_relative_to_the_root(corpus):
    ids = _ids(Source(SourceSettings(uri=str(corpus))))
    assert "guides/setup.md" in ids and "ko/remote-work.docx" in ids
    assert all(not i.startswith("/") for i in ids)


def test_globs_and_hidden_files(corpus):
    (corpus / ".git").mkdir()
    (corpus / ".git" / "notes.md").write_text("# hidden")
    (corpus / "image.png").write_bytes(b"\x89PNG")
    assert "image.png" not in _ids(Source(SourceSettings(uri=str(corpus))))
    assert ".git/notes.md" not in _ids(Source(SourceSettings(uri=str(corpus))))
    only_md = _ids(Source(SourceSettings(uri=str(corpus), include=["*.md"])))
    assert set(only_md) == {"guides/setup.md", "guides/troubleshooting.md", "ko/onboarding.md"}
    no_ko = _ids(Source(SourceSettings(uri=str(corpus), exclude=["ko/**"])))
    assert not any(i.startswith("ko/") for i in no_ko)


def test_selected_matches_double_star():
    assert selected("a/b/c.md", ["**/*.md"], [])
    assert selected("c.md", ["**/*.md"], [])
    assert not selected("a/c.md", [], ["a/*"])


def test_symlink_loops_are_reported_not_followed(corpus):
    os.symlink(corpus / "loop.md", corpus / "loop.md")  # a link to itself
    os.symlink(corpus, corpus / "guides" / "up")  # a folder link back to the root
    src = Source(SourceSettings(uri=str(corpus)))
    entries = {e.rel: e for e in src.iter_entries()}
    assert entries["loop.md"].error == "symlink loop"
    assert not any(r.startswith("guides/up/") for r in entries)
    assert src.listing_errors and "loop" in src.listing_errors[0][1]


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="cannot be opened"):
        list(Source(SourceSettings(uri=str(tmp_path / "nope"))).iter_entries())


def test_the_clis_early_check_finds_the_folder_the_source_lists(tmp_path, monkeypatch):
    """`lanceflow ingest` checks a local source before anything starts: '~' and file://
    spellings name the folder that Source (fsspec) lists, so a source that a run reads is
    never refused early, and one it cannot open is."""
    from tasks.sources import stat_local_root
    from tasks.storage import local_path

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text", encoding="utf-8")
    for uri in ("~/docs", f"file://{tmp_path}/docs", str(tmp_path / "docs")):
        path = local_path(uri)
        assert path == str(tmp_path / "docs")
        stat_local_root(uri, path)
        assert [e.rel for e in Source(SourceSettings(uri=uri)).iter_entries()] == ["a.txt"]
    with pytest.raises(SourceError, match="'~/nope' cannot be opened"):
        stat_local_root("~/nope", local_path("~/nope") or "")
    assert local_path("s3://bucket/docs") is None


def test_jsonl_records_use_their_id_column(tmp_path):
    p = tmp_path / "docs.jsonl"
    rows = [{"_id": "a", "title": "T", "text": "x"}, {"_id": "b", "text": "y"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n", encoding="utf-8")
    src = Source(SourceSettings(uri=str(p)))
    [entry] = list(src.iter_entries())
    recs = list(src.iter_records(entry))
    assert [r.doc_id for r in recs if isinstance(r, Record)] == ["a", "b"]
    assert isinstance(recs[2], RecordError) and recs[2].line == 3


def test_csv_and_parquet_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text("id,title,text\n1,One,first\n2,Two,second\n", encoding="utf-8")
    pq.write_table(pa.table({"doc_id": ["p1"], "text": ["parquet text"]}), tmp_path / "b.parquet")
    src = Source(SourceSettings(uri=str(tmp_path)))
    got = {}
    for e in src.iter_entries():
        for r in src.iter_records(e):
            assert isinstance(r, Record)
            got[r.doc_id] = r.text
    assert got == {"1": "first", "2": "second", "p1": "parquet text"}


def test_ids_are_deterministic():
    assert content_hash(b"x") == content_hash(b"x") != content_hash(b"y")
    h = text_hash("chunk")
    assert chunk_id("d", 0, h) == chunk_id("d", 0, h)
    assert chunk_id("d", 0, h) != chunk_id("e", 0, h) != chunk_id("d", 1, h)


def test_verify_and_sources_without_times_rehash_every_file(corpus):
    from tasks.plan import plan_changes
    from tasks.store import ManifestRow

    source = Source(SourceSettings(uri=str(corpus)))
    entries = list(source.iter_entries())
    manifest = {e.rel: ManifestRow("old-hash", e.size, e.mtime, "ok", e.rel) for e in entries}
    plan = plan_changes(source, manifest)
    assert plan.unchanged == len(entries) and plan.to_process == 0
    plan.cleanup()
    verified = plan_changes(source, manifest, verify=True)
    assert verified.unchanged == 0 and verified.to_process == len(entries)
    verified.cleanup()
    source.reliable_mtime = False  # e.g. a store whose listing gives no modification time
    blind = plan_changes(source, manifest)
    assert blind.to_process == len(entries)
    blind.cleanup()


def test_scratch_left_by_a_killed_run_is_swept_by_the_next(tmp_path):
    import subprocess
    import sys

    from tasks import scratch

    # a process that has ended and been reaped: no process has its pid (reuse within this
    # test would need the pid counter to wrap around)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = scratch._host()
    dead = tmp_path / f"lanceflow-plan-{host}-{ended.pid}-abcd1234"
    live = tmp_path / f"lanceflow-plan-{host}-{os.getppid()}-abcd1234"
    elsewhere = tmp_path / f"lanceflow-plan-otherhost-{ended.pid}-abcd1234"
    other_kind = tmp_path / f"lanceflow-ray-{host}-{ended.pid}-abcd1234"
    for d in (dead, live, elsewhere, other_kind):
        d.mkdir()
        (d / "work.arrow").write_bytes(b"x" * 100)
    made = scratch.scratch_dir("plan", str(tmp_path))
    assert not dead.exists()
    assert live.exists() and elsewhere.exists() and other_kind.exists()
    assert os.path.basename(made).startswith(f"lanceflow-plan-{host}-{os.getpid()}-")
    # the new folder is this (live) process's: the next sweep keeps it
    assert scratch.sweep_scratch("plan", str(tmp_path)) == []
    assert os.path.isdir(made)


def test_one_source_under_several_spellings(tmp_path, monkeypatch):
    from tasks.sources import canonical_source_uri

    (tmp_path / "docs").mkdir()
    monkeypatch.chdir(tmp_path)
    want = str((tmp_path / "docs").resolve())
    for spelling in ("docs", "./docs/", str(tmp_path / "docs") + "/", f"file://{want}"):
        assert canonical_source_uri(spelling) == want
    assert canonical_source_uri("S3://bucket//prefix/") == "s3://bucket/prefix"
    assert canonical_source_uri("s3a://bucket/prefix") == "s3://bucket/prefix"
    assert canonical_source_uri("gcs://b/p/") == "gs://b/p"
