"""Version tags, rollback and the maintenance flow, under the Prefect test harness."""

from __future__ import annotations

import shutil
import time

import pytest

from flows.evaluate import evaluate
from flows.ingest import ingest, run_ingest
from flows.maintain import maintain
from tasks import versions
from tasks.errors import ConfigurationError
from tasks.settings import IngestParams, MaintainSettings
from tasks.store import Store

from .conftest import SAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

HASH = {"kind": "hash"}


def _params(src, db, **kw):
    return IngestParams.model_validate(
        {"source": {"uri": str(src)}, "store": {"uri": str(db)}, "embedder": HASH, **kw}
    )


def _edit(src, n: int) -> None:
    (src / "guides" / "coffee.txt").write_text(f"coffee machine notes, revision {n}\n" * 5)


def test_each_run_that_changes_the_table_tags_it_and_a_no_change_run_reuses_the_tag(tmp_path):
    src = tmp_path / "corpus"
    shutil.copytree(SAMPLES, src)
    db = tmp_path / "db"
    first = run_ingest(_params(src, db))
    again = run_ingest(_params(src, db))
    assert first.tag and again.tag == first.tag
    _edit(src, 1)
    second = run_ingest(_params(src, db))
    assert second.tag not in ("", first.tag)
    store = Store(str(db))
    assert [t.tag for t in versions.ingest_tags(store)] == [first.tag, second.tag]
    chunks = store.chunks_table()
    assert set(chunks.tags.list()) == {first.tag, second.tag}
    assert set(store.documents().tags.list()) == {first.tag, second.tag}

    # one step back, then (after the rollback) no further than the oldest tag
    assert versions.rollback(store).tag == first.tag
    assert versions.current_tag(store) == first.tag
    with pytest.raises(ConfigurationError, match="oldest tag"):
        versions.rollback(store)
    with pytest.raises(ConfigurationError, match="no tag 'nope'"):
        versions.rollback(store, "nope")
    # the restored manifest is older than the source: the next run re-embeds the difference
    # and its tag's parent is the restored tag, not the rejected one
    third = run_ingest(_params(src, db))
    assert third.documents.changed == 1 and third.tag not in (first.tag, second.tag)
    assert versions.rollback(Store(str(db))).tag == first.tag


def test_maintenance_prunes_old_tags_and_versions_but_keeps_every_tag_it_needs(tmp_path):
    src = tmp_path / "corpus"
    shutil.copytree(SAMPLES, src)
    db = tmp_path / "db"
    tags = []
    for n in range(4):
        _edit(src, n)
        tags.append(run_ingest(_params(src, db)).tag)
    store = Store(str(db))
    before = len(store.chunks_table().list_versions())
    time.sleep(1.1)
    result = maintain(
        table=str(db),
        maintenance=MaintainSettings(retention_days=0, keep_tags=2, verify=False),
    )
    done = result["maintenance"]
    assert done["tags_removed"] == tags[:2]
    assert done["tags_kept"] == sorted(tags[2:])
    assert done["versions_removed"] > 0
    store = Store(str(db))
    chunks = store.chunks_table()
    assert len(chunks.list_versions()) < before
    # the kept tags still open, and rollback to the older one works
    for tag in tags[2:]:
        view = store.db.open_table(store.chunks_name)
        view.checkout(tag)
        assert view.count_rows() > 0
    # compaction rewrote the tables, not their content: an unchanged run keeps the tag
    assert run_ingest(_params(src, db)).tag == tags[3]
    assert versions.rollback(Store(str(db))).tag == tags[2]


def test_maintenance_verify_pass_runs_the_ingest_inside_the_same_write_slot(tmp_path):
    src = tmp_path / "corpus"
    shutil.copytree(SAMPLES, src)
    db = tmp_path / "db"
    run_ingest(_params(src, db))
    # same size and modification time, new content: only a verify pass sees it
    path = src / "guides" / "coffee.txt"
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace("a", "o", 1) if "a" in text else text[::-1])
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = maintain(
        table=str(db),
        source=str(src),
        embedder=IngestParams.model_validate({"source": {"uri": "x"}, "embedder": HASH}).embedder,
        maintenance=MaintainSettings(verify=True),
    )
    assert result["verify"]["documents"]["changed"] == 1


def test_flow_parameters_explain_themselves_in_the_ui_form():
    """Every top-level parameter has a description, every nested setting a title and a
    description; choices are enums and numbers have bounds, so the form rejects bad input."""
    for fl in (ingest, evaluate, maintain):
        schema = fl.parameters.model_dump()
        for name, prop in schema["properties"].items():
            assert prop.get("title") == name
            ref = prop.get("$ref", "").rsplit("/", 1)[-1]
            described = prop.get("description") or schema["definitions"].get(ref, {}).get(
                "description"
            )
            assert described, f"{fl.name}.{name} has no description"
        for model, definition in schema["definitions"].items():
            for field, prop in definition["properties"].items():
                assert prop.get("title"), (model, field)
                assert prop.get("description"), f"{model}.{field} has no description"
    schema = ingest.parameters.model_dump()
    assert schema["required"] == ["source"]
    embedder = schema["definitions"]["EmbedderSettings"]["properties"]
    assert embedder["kind"]["enum"] == ["local", "openai", "hash"]
    run = schema["definitions"]["RunSettings"]["properties"]
    assert run["batch_docs"]["minimum"] == 1
    assert run["max_delete_fraction"]["maximum"] == 1.0
