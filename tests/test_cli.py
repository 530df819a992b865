"""The `lanceflow` command line in real subprocesses (each run starts Prefect's temporary
server): JSON output, exit codes, and a crash mid-run followed by a re-run that converges to
exactly what a clean run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tasks.store import CHUNKS, DOCUMENTS, Store

from .conftest import REPO, run_cli, synthetic_records, write_records

pytestmark = pytest.mark.slow


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: each command starts Prefect's temporary server."""
    return run_cli(dict(os.environ, PYTHONPATH=str(REPO)), *args, check=check)


def test_ingest_json_report_and_search_json(corpus, tmp_path, cli_env):
    db = str(tmp_path / "db")
    out = run_cli(cli_env, "ingest", str(corpus), "--table", db, "--json")
    report = json.loads(out.stdout)  # stdout holds nothing but the report
    assert set(report["documents"]) >= {"seen", "new", "changed", "unchanged", "deleted", "failed"}
    assert set(report["chunks"]) >= {"embedded", "cached", "written", "deleted"}
    assert {"failures", "table_version", "seconds"} <= set(report)
    assert report["documents"]["new"] == 8
    again = json.loads(run_cli(cli_env, "ingest", str(corpus), "--table", db, "--json").stdout)
    assert again["documents"]["unchanged"] == 8 and again["chunks"]["embedded"] == 0
    hits = json.loads(
        run_cli(cli_env, "search", "paid vacation days", "--table", db, "--json", "-k", "2").stdout
    )
    assert hits[0]["doc_id"] == "reports/vacation-policy.html"
    assert set(hits[0]) == {"doc_id", "chunk_id", "text", "score", "source", "generation"}
    assert hits[0]["source"] == str(corpus.resolve()) and hits[0]["generation"] == 1


def test_exit_codes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.pdf").write_bytes(b"broken")
    (src / "b.txt").write_text("fine text")
    (src / "c.docx").write_bytes(b"broken")
    failed = _cli("ingest", str(src), "--table", str(tmp_path / "db"), "--json", check=False)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["documents"]["failed"] == 2
    assert "max_failed_fraction" in failed.stderr
    missing = _cli("ingest", str(tmp_path / "nope"), "--table", str(tmp_path / "new"), check=False)
    assert missing.returncode == 2 and "cannot be opened" in missing.stderr
    # a mistyped local path is refused before anything starts: no flow run, no table
    assert "prefect" not in missing.stderr.lower() and not (tmp_path / "new").exists()
    url = _cli("ingest", f"file://{tmp_path}/nope", "--table", str(tmp_path / "new"), check=False)
    assert url.returncode == 2 and "cannot be opened" in url.stderr


def _snapshot(db: str) -> tuple[dict, dict]:
    store = Store(db)
    data = (
        store.table(CHUNKS)
        .search()
        .select(["chunk_id", "doc_id", "text", "vector"])
        .limit(None)
        .to_arrow()
    )
    ids = data.column("chunk_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate chunk ids"
    chunks = {
        cid: (doc, text, np.asarray(vec, dtype=np.float32))
        for cid, doc, text, vec in zip(
            ids,
            data.column("doc_id").to_pylist(),
            data.column("text").to_pylist(),
            data.column("vector").to_pylist(),
            strict=True,
        )
    }
    docs = store.table(DOCUMENTS).search().limit(None).to_arrow().to_pylist()
    manifest = {r["doc_id"]: (r["content_hash"], r["chunk_count"], r["status"]) for r in docs}
    return chunks, manifest


def test_crash_mid_run_then_rerun_converges(tmp_path, cli_env):
    src = tmp_path / "src"
    src.mkdir()
    write_records(src / "corpus.jsonl", synthetic_records(240, seed=9))
    crashed = str(tmp_path / "crashed")
    env = cli_env
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "ingest",
            str(src),
            "--table",
            crashed,
            "--batch-docs",
            "16",
            "--checkpoint-minutes",  # a commit per batch: the kill lands between commits
            "0",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 400
    written = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            written = Store(crashed).table(DOCUMENTS).count_rows()
        except Exception:
            continue
        if written >= 48:
            break
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < written < 240
    rerun = json.loads(run_cli(cli_env, "ingest", str(src), "--table", crashed, "--json").stdout)
    assert rerun["documents"]["failed"] == 0
    clean = str(tmp_path / "clean")
    run_cli(cli_env, "ingest", str(src), "--table", clean, "--json")
    got_chunks, got_manifest = _snapshot(crashed)
    want_chunks, want_manifest = _snapshot(clean)
    assert got_manifest == want_manifest
    assert set(got_chunks) == set(want_chunks)
    for cid, (doc, text, vec) in want_chunks.items():
        gdoc, gtext, gvec = got_chunks[cid]
        assert (gdoc, gtext) == (doc, text)
        np.testing.assert_array_equal(gvec, vec)  # bit for bit


def test_prepare_model_resolves_and_exports_the_bundled_model_for_an_image(tmp_path):
    """What the Dockerfile's build step runs: no ingest, the model's revision hashed and its
    int8 ONNX file exported into LANCEFLOW_CACHE_DIR, so a worker starts at once."""
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO), LANCEFLOW_CACHE_DIR=str(cache))
    out = run_cli(env, "prepare-model")
    assert "onnx-int8" in out.stdout and "384 dimensions" in out.stdout
    assert list(cache.glob("onnx/*/model_int8_*.onnx")), sorted(cache.rglob("*"))


def test_int8_weights_are_8_bit_on_a_vnni_cpu_and_7_bit_elsewhere_in_files_named_apart(
    tmp_path, monkeypatch
):
    """ONNX Runtime's AVX2 kernel can saturate with 8-bit weights: without VNNI they are
    quantised to 7 bits. A file made for one kind of CPU is never used on the other."""
    import onnx
    from onnx import numpy_helper

    from tasks.embedders import local
    from tasks.settings import DEFAULT_MODEL

    monkeypatch.setenv("LANCEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = local.resolve_model_dir(DEFAULT_MODEL)
    widest = {}
    for vnni in (True, False):
        path = local.export_onnx(model_dir, quantized=True, vnni=vnni)
        weights = [
            numpy_helper.to_array(t)
            for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
        ]
        assert weights, path
        widest[path.name] = max(int(abs(w.astype("int16")).max()) for w in weights)
    assert widest["model_int8_vnni.onnx"] == 127
    assert widest["model_int8_7bit.onnx"] <= 64


def test_a_load_waits_for_the_export_another_process_has_under_way(tmp_path, monkeypatch):
    """One process exports at a time: a load that finds the export lock held waits for the
    holder's file and uses it, rather than exporting a second time beside it."""
    import threading

    from tasks.embedders import local
    from tasks.settings import DEFAULT_MODEL

    monkeypatch.setenv("LANCEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = local.resolve_model_dir(DEFAULT_MODEL)
    wanted = local.onnx_file(model_dir, quantized=True)
    wanted.parent.mkdir(parents=True)
    holding = threading.Event()

    def other_exporter() -> None:
        with local._export_lock(wanted.parent):  # another open file: flock excludes it too
            holding.set()
            time.sleep(1.5)
            wanted.write_bytes(b"the other exporter's file")

    other = threading.Thread(target=other_exporter)
    other.start()
    assert holding.wait(10)
    started = time.monotonic()
    assert local.export_onnx(model_dir, quantized=True) == wanted
    other.join()
    assert time.monotonic() - started >= 1.0  # it waited for the lock
    assert wanted.read_bytes() == b"the other exporter's file"  # and exported nothing itself
    assert not (wanted.parent / "model.onnx").exists()


@pytest.mark.parametrize("child", ["exports", "fails"])
def test_a_first_run_exports_the_model_in_a_child_process_and_loads_its_file(tmp_path, child):
    """prepare_model starts the one-time ONNX export in a child process (the CLI calls it
    before it loads LanceDB or starts Prefect's server, and waits for the torch stage: the
    fp32 graph); the model's load waits for the quantised file, so the run's own process
    never imports torch or transformers. Should the child fail, the wait ends with it and
    the load exports the model itself."""
    script = (
        "import json, sys\n"
        + (
            "sys.executable = '/bin/false'  # a child that fails at once\n"
            if child == "fails"
            else ""
        )
        + "from tasks.embedding import prepare_model\n"
        "from tasks.settings import EmbedderSettings\n"
        "from tasks.embedders.local import get_local_embedder, onnx_file, _EXPORT_CHILDREN\n"
        "s = EmbedderSettings()\n"
        "started = prepare_model(s, wait_for_graph=True)  # as the CLI calls it\n"
        "emb = get_local_embedder(s.model, s.device, s.backend, s.batch_size)\n"
        "graph = onnx_file(emb.model_dir, quantized=False).exists()\n"
        "again = prepare_model(s)  # one child per file\n"
        "v = emb.embed(['a first run on a fresh machine'])\n"
        "child = _EXPORT_CHILDREN[0]\n"
        "print(json.dumps({'started': started, 'again': again, 'backend': emb.backend,\n"
        "  'graph': graph,\n"
        "  'child_rc': child.wait(60), 'children': len(_EXPORT_CHILDREN), 'dim': int(v.shape[1]),\n"
        "  'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules}))\n"
    )
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO), LANCEFLOW_CACHE_DIR=str(cache))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["started"] is True
    assert got["backend"] == "onnx-int8" and got["dim"] == 384
    if child == "exports":
        assert got["again"] is False and got["children"] == 1
        assert got["child_rc"] == 0 and got["torch"] is False and got["transformers"] is False
        assert got["graph"] is True  # the wait ended with the torch stage done
    else:
        assert got["graph"] is False  # the wait ended with the failed child
        assert got["child_rc"] != 0 and got["torch"] is True  # the load exported it
    assert len(list(cache.glob("onnx/*/model_int8_*.onnx"))) == 1
    assert not list(cache.glob("onnx/*/*.tmp*"))


def test_an_onnx_graph_that_kept_the_traced_shape_fails_the_export_check(tmp_path):
    """A traced export can freeze a shape at the example's (2 texts of 16 tokens); the check
    runs shapes the trace never saw, so such a graph is rejected (and torch.export used)."""
    import torch

    from tasks.embedders import local

    class Honest(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(1000, 8)

        def forward(self, input_ids, attention_mask):
            return self.emb(input_ids) * attention_mask.unsqueeze(-1)

    class Frozen(Honest):
        def forward(self, input_ids, attention_mask):
            width = int(input_ids.shape[1])  # a Python int: a constant in the trace
            return super().forward(input_ids, attention_mask)[:, :width]

    for module, ok in ((Honest().eval(), True), (Frozen().eval(), False)):
        path = tmp_path / f"{type(module).__name__}.onnx"
        local._export_graph(module, path, traced=True)
        if ok:
            local._check_export(module, path, vocab=1000)
        else:
            with pytest.raises(ValueError, match="differs from the model"):
                local._check_export(module, path, vocab=1000)
