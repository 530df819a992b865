"""Pure units over a real LanceDB in tmp_path: the embedding cache, replacing chunks and the
model guard, with the deterministic fake embedder."""

from __future__ import annotations

import pytest

from tasks.chunking import Chunker
from tasks.documents import DocOutcome
from tasks.embedding import embed_outcomes
from tasks.errors import ModelMismatchError
from tasks.parsing import ParsedDocument
from tasks.report import IngestReport
from tasks.store import CHUNKS, Store, TableModel
from tasks.writing import write_batch


@pytest.fixture(scope="module")
def chunker():
    from tasks.embedders.local import load_tokenizer, resolve_model_dir
    from tasks.settings import DEFAULT_MODEL

    return Chunker(load_tokenizer(resolve_model_dir(DEFAULT_MODEL)), 40)


def _outcome(doc_id: str, text: str, chunker: Chunker, state: str = "new") -> DocOutcome:
    o = DocOutcome(doc_id, state, doc_id, len(text), 1.0, content_hash=str(hash(text)))
    o.parsed = ParsedDocument(doc_id, text)
    o.chunks = chunker.split(o.parsed)
    return o


TEXT = (
    "Lance is a columnar format for machine learning data. It stores vectors next to the rows. "
    "Prefect runs the flows that keep the index fresh every night. "
)


def test_identical_chunks_are_embedded_once(tmp_path, fake_embedder, chunker):
    store = Store(str(tmp_path / "db"))
    a = _outcome("a.md", TEXT, chunker)
    b = _outcome("copy-of-a.md", TEXT, chunker)  # a duplicate file
    batch = embed_outcomes([a, b], fake_embedder, store, "local")
    n = len(a.chunks)
    assert batch.embedded == n and batch.cached == n
    assert len(fake_embedder.texts) == n and fake_embedder.batches == 1
    store.chunks(TableModel(fake_embedder.model_id, 16, "local"))
    write_batch(store, [a, b], batch.rows, IngestReport())
    # a renamed file later: every vector comes from the table
    c = _outcome("renamed.md", TEXT, chunker)
    again = embed_outcomes([c], fake_embedder, store, "local")
    assert again.embedded == 0 and again.cached == n
    assert fake_embedder.batches == 1


def test_replacing_a_document_drops_its_old_chunks_only(tmp_path, fake_embedder, chunker):
    store = Store(str(tmp_path / "db"))
    store.chunks(TableModel(fake_embedder.model_id, 16, "local"))
    a = _outcome("a.md", TEXT * 3, chunker)
    b = _outcome("b.md", "Another document about coffee machines and descaling them.", chunker)
    report = IngestReport()
    write_batch(store, [a, b], embed_outcomes([a, b], fake_embedder, store, "local").rows, report)
    before = store.table(CHUNKS).count_rows()
    a2 = _outcome("a.md", TEXT, chunker, state="changed")
    report2 = IngestReport()
    write_batch(store, [a2], embed_outcomes([a2], fake_embedder, store, "local").rows, report2)
    tbl = store.table(CHUNKS)
    assert tbl.count_rows("doc_id = 'a.md'") == len(a2.chunks)
    assert tbl.count_rows("doc_id = 'b.md'") == len(b.chunks)
    assert tbl.count_rows() == before - len(a.chunks) + len(a2.chunks)
    assert report2.documents.changed == 1
    assert report2.chunks.deleted == len(a.chunks) - len(a2.chunks)


def test_another_model_is_refused(tmp_path):
    store = Store(str(tmp_path / "db"))
    store.chunks(TableModel("model-a", 16, "local"))
    store.check_model("model-a", "local", 16)
    with pytest.raises(ModelMismatchError, match="model-a"):
        store.check_model("model-b", "local")
    with pytest.raises(ModelMismatchError, match="16-dimensional"):
        store.check_model("model-a", "local", 32)
