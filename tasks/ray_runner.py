"""`--runner ray`: one ingest's parse, embed and write stages as a Ray Data pipeline.

Prefect orchestrates the run as on the default runner (plan, deletions, indexes, generation
switch, report); the coarse step between the plan and the deletions is this module:

    shards (the plan's work, a batch of documents each, put in Ray's object store)
      -> parse_and_chunk   CPU tasks: read, parse and chunk the shard's documents
      -> EmbedWorker       an actor pool: the model loads once per actor (num_gpus per actor on
                           a GPU cluster); the table's embedding cache is consulted first
      -> write_fragments   CPU tasks: each batch's rows become Lance data files in parallel
      -> one commit        on the driver, once every shard succeeded: the new fragments and
                           the deletion files of the documents they replace, in ONE Lance
                           transaction (one new table version for the whole run)
      -> manifest rows     only after the commit, as on the default runner, so a crash in
                           between makes the next run redo those documents (and converge)

Everything that crosses a process boundary is plain data: the run's settings (a pydantic
model), the generation, shard tables, pickled per-document outcomes, Arrow IPC bytes and
fragment metadata as JSON. Worker-side objects (source, chunker, embedder, store) are built
once per worker process from those settings.

The rows are built by the same function as on the default runner (tasks.embedding.
embed_outcomes), so both runners write identical chunk ids, texts and vectors.

Long text documents (tasks.streaming) are not split across Ray workers: they come back from
the pipeline unprocessed and the driver streams them a segment at a time afterwards.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import SecretStr

from tasks.commits import commit_spilled, slim_outcomes
from tasks.commits import write_fragments as write_fragments_of
from tasks.errors import ConfigurationError, LanceflowError
from tasks.generations import Generation
from tasks.memory import LANCE_IO_BUFFER_VAR
from tasks.scratch import scratch_dir
from tasks.settings import RAY_ACTOR_CPUS, RAY_TASK_CPUS, IngestParams

log = logging.getLogger(__name__)

# logical CPUs each stage reserves per task or actor (RAY_ACTOR_CPUS, RAY_TASK_CPUS in
# tasks.settings): fractions, so that on a small node the embedding actors (which hold their
# share for the whole run) never starve the parse and write tasks of a CPU to be scheduled
# on: the OS shares the real cores among them
#: restarts of an embedding actor (and retries of its shard) before the run fails
MAX_RESTARTS = 3


class RayRunnerError(LanceflowError):
    """Ray is missing, unreachable, or its pipeline failed."""


@dataclass(frozen=True)
class RayJob:
    """What a worker needs to rebuild its side of one run: settings, never live objects."""

    params: IngestParams
    generation: Generation
    cache_tables: tuple[str, ...]
    source_uri: str
    dataset_uri: str  # the chunks table's Lance dataset
    #: the table's storage options, resolved on the driver (credentials blocks included)
    storage_options: dict[str, str] | None = field(default=None, repr=False)
    job_id: str = ""
    #: the table's Lance file format version (new data files must match it)
    data_storage_version: str | None = None
    #: the OpenAI key resolved on the driver (workers may have no Prefect API or environment)
    api_key: SecretStr | None = None


@dataclass
class RayResult:
    """What the pipeline did, for the run's report."""

    embedded: int = 0
    cached: int = 0
    fragments: int = 0
    version_before: int = 0
    version_after: int = 0
    streamed: list[Any] = field(default_factory=list)


# ---- worker side -------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}
_WORKER_LOCK = threading.Lock()


def _worker_objects(job: RayJob) -> dict[str, Any]:
    """Source, chunker, embedder and store of this job, once per worker process."""
    with _WORKER_LOCK:
        objs = _WORKER.get(job.job_id)
        if objs is None:
            from tasks.embedding import build_embedder, make_chunker
            from tasks.memory import WRITE_CACHE_MB
            from tasks.sources import Source
            from tasks.store import Store

            embedder = build_embedder(job.params.embedder, api_key=job.api_key)
            # options and credentials were resolved on the driver: a worker needs no Prefect API
            store = Store(
                job.params.store.uri,
                storage_options=job.storage_options,
                cache_mb=WRITE_CACHE_MB,
            )
            store = store.at(job.generation)
            objs = {
                "source": Source(job.params.source),
                "embedder": embedder,
                # the CPU workers tokenise as they chunk; the model (int8 ONNX on CPU actors,
                # torch on GPU actors) reads those ids
                "chunker": make_chunker(embedder, job.params.chunking),
                "store": store,
            }
            _WORKER.clear()  # one job per worker process at a time
            _WORKER[job.job_id] = objs
        return objs


def parse_and_chunk(batch: pa.Table, job: RayJob) -> pa.Table:
    """Ray Data stage (CPU tasks): one shard of planned work -> its chunked outcomes."""
    from tasks.documents import chunk_outcomes, read_and_parse

    objs = _worker_objects(job)
    out = []
    max_bytes = int(job.params.source.max_file_mb * 2**20)
    for blob in batch.column("items").to_pylist():
        items = pickle.loads(blob)
        outcomes = read_and_parse(items, objs["source"], max_bytes)
        chunk_outcomes(outcomes, objs["chunker"])
        out.append(pickle.dumps(outcomes, protocol=5))
    return pa.table({"outcomes": pa.array(out, pa.large_binary())})


class EmbedWorker:
    """Ray Data stage (an actor pool): the model is loaded once per actor."""

    def __init__(self, job: RayJob) -> None:
        self.job = job
        objs = _worker_objects(job)
        self.embedder = objs["embedder"]
        self.store = objs["store"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from tasks.crashpoints import crash_point
        from tasks.embedding import embed_outcomes

        rows_out, outcomes_out, embedded, cached = [], [], [], []
        for blob in batch.column("outcomes").to_pylist():
            outcomes = pickle.loads(blob)
            result = embed_outcomes(
                outcomes,
                self.embedder,
                self.store,
                self.job.params.embedder.kind,
                self.job.source_uri,
                cache_tables=self.job.cache_tables,
            )
            crash_point("ray-embed")
            if result.rows is not None:
                rows_out.append(_to_ipc(result.rows))
            else:
                rows_out.append(b"")
            slim_outcomes(outcomes, result.rows)  # the manifest needs counts, not texts
            outcomes_out.append(pickle.dumps(outcomes, protocol=5))
            embedded.append(result.embedded)
            cached.append(result.cached)
        return pa.table(
            {
                "rows": pa.array(rows_out, pa.large_binary()),
                "outcomes": pa.array(outcomes_out, pa.large_binary()),
                "embedded": pa.array(embedded, pa.int64()),
                "cached": pa.array(cached, pa.int64()),
            }
        )


def write_fragments(batch: pa.Table, job: RayJob) -> pa.Table:
    """Ray Data stage (CPU tasks): a batch's rows become Lance data files (not committed)."""
    frags_out: list[list[str]] = []
    counts: list[int] = []
    for blob in batch.column("rows").to_pylist():
        if not blob:
            frags_out.append([])
            counts.append(0)
            continue
        rows = pa.ipc.open_stream(blob).read_all()
        counts.append(rows.num_rows)
        frags_out.append(
            write_fragments_of(rows, job.dataset_uri, job.storage_options, job.data_storage_version)
        )
    return pa.table(
        {
            "fragments": pa.array(frags_out, pa.list_(pa.string())),
            "outcomes": batch.column("outcomes"),
            "embedded": batch.column("embedded"),
            "cached": batch.column("cached"),
            "chunks": pa.array(counts, pa.int64()),
        }
    )


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# ---- driver side -------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigurationError(
            "--runner ray needs Ray: pip install 'lanceflow[ray]' (on every node of the cluster)"
        ) from None
    return ray


#: (session, worker_env()) of the local Ray instance this process started: its workers
#: inherited those variables (None: it joined a cluster, or Ray was started by someone else)
_LOCAL_ENV: tuple[str, dict[str, str]] | None = None


def quiet_known_warnings() -> None:
    """Warnings every Ray run printed that concern nothing it does:
    - lancedb's "fork support is experimental" and pylance's "lance is not fork-safe", once
      per process Ray starts: Ray starts them with subprocess, which replaces the forked child
      with a new program at once, so no Lance or lancedb runtime runs in it;
    - Ray Data's "`ray_remote_args` is deprecated", for the actors' max_restarts and
      max_task_retries: Ray 2.60 (the version pinned) has no named parameter for them."""
    warnings.filterwarnings(
        "ignore", message="lancedb fork support is experimental", category=RuntimeWarning
    )
    warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
    warnings.filterwarnings(
        "ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning
    )


def connect(address: str | None, num_cpus: int | None = None, memory_mb: int = 256) -> Any:
    """Join the Ray cluster at `address` ('auto', 'ray://host:10001'), or start a local one
    (`num_cpus` CPUs, an object store of twice `memory_mb`: Ray's default is 30 % of the
    machine's memory); a process already connected keeps its connection."""
    global _LOCAL_ENV
    quiet_known_warnings()
    ray = _import_ray()
    if ray.is_initialized():
        if address:
            log.warning(
                "this process is connected to Ray already; --ray-address %s is unused", address
            )
        return ray
    common = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    try:
        try:
            sizes = (
                {}
                if address
                else {
                    "num_cpus": num_cpus,
                    "object_store_memory": 2 * memory_mb * 2**20,
                    **_keep_workers(num_cpus),
                }
            )
            env = worker_env()
            ray.init(address=address or None, **sizes, **common)
            _LOCAL_ENV = None if address else (ray.get_runtime_context().get_session_name(), env)
        except ValueError as exc:
            # no address, but Ray joined a running cluster (RAY_ADDRESS, or one `ray start`
            # left on this machine): that cluster keeps its own sizes
            if "existing cluster" not in str(exc):
                raise
            log.info(
                "joining the running Ray cluster; --ray-cpus/--ray-memory-mb size only "
                "a new local instance"
            )
            ray.init(address=address or None, **common)
    except Exception as exc:
        raise RayRunnerError(
            f"cannot reach the Ray cluster at {address or 'a new local instance'}: "
            f"{type(exc).__name__}: {exc}. Start one (`ray start --head`) or pass "
            "--ray-address"
        ) from None
    return ray


@dataclass
class _EarlyStart:
    """A connect() begun in a thread by start_early(), for the next ray_session()."""

    key: tuple[str | None, int | None, int]
    connected: threading.Event = field(default_factory=threading.Event)
    #: set once the connection is closed: the thread that started a local instance must
    #: outlive it (Ray starts its processes with a parent-death signal, which Linux sends
    #: when that thread ends, not the process)
    released: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


_EARLY: list[_EarlyStart] = []


class _NotMainThread(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # Ray leaves SIGTERM to the main thread's handlers when started from another thread:
        # what start_early does on purpose
        return "SIGTERM handler is not set" not in record.getMessage()


def start_early(address: str | None, num_cpus: int | None = None, memory_mb: int = 256) -> None:
    """Begin connect() in a background thread, so that a local instance's start (its
    processes and their first imports, 3-4 s of CPU) overlaps Prefect's start-up and the
    plan instead of following them; on a machine with one core it only moves. The next
    ray_session() with the same arguments waits for it and owns the connection (closing it
    at the step's end); stop_early() closes one that no step used. For a command that runs
    one ingest and exits (the CLI): a process that stays up calls ray_session() alone."""
    ray = _import_ray()
    if ray.is_initialized() or _EARLY:
        return
    early = _EarlyStart((address, num_cpus, memory_mb))

    def begin() -> None:
        quiet = _NotMainThread()
        logging.getLogger("ray._private.worker").addFilter(quiet)
        try:
            connect(address, num_cpus, memory_mb)
        except BaseException as exc:  # noqa: BLE001 - raised again by the step that needs Ray
            early.error = exc
            return
        finally:
            logging.getLogger("ray._private.worker").removeFilter(quiet)
            early.connected.set()
        early.released.wait()

    _EARLY.append(early)
    threading.Thread(target=begin, name="ray-start", daemon=True).start()


def _take_early(key: tuple[str | None, int | None, int]) -> _EarlyStart | None:
    """Wait for start_early()'s connect(): the early start, whose connection the caller now
    owns (None: there was none). Its error, if it failed, is raised here."""
    if not _EARLY:
        return None
    early = _EARLY.pop()
    early.connected.wait()
    if early.error is not None:
        raise early.error
    if early.key != key:
        log.warning("Ray was started with other settings than this step's; they are kept")
    return early


def stop_early() -> None:
    """Close a connection start_early() opened and no step used (the run had no work for
    Ray)."""
    if not _EARLY:
        return
    early = _EARLY.pop()
    early.connected.wait()
    if early.error is None:
        disconnect(_import_ray())
    early.released.set()


@contextmanager
def ray_session(
    address: str | None,
    num_cpus: int | None = None,
    memory_mb: int = 256,
    timings: dict[str, float] | None = None,
) -> Iterator[Any]:
    """connect() for one coarse step (`timings['ray_start']`: its seconds, or the wait for
    start_early()'s). A connection this opens, or start_early() opened, is closed when the
    step ends: a local instance it started stops with its worker processes, so their memory
    (every actor's model, the heaps the pipeline grew, their maps of the object store) is not
    held through the index refresh that follows, nor by a long-lived process between runs. A
    connection the process had already (a notebook's, a test session's, the step before's)
    is kept."""
    ray = _import_ray()
    clock = time.perf_counter()
    early = _take_early((address, num_cpus, memory_mb))
    opened = early is not None or not ray.is_initialized()
    ray = connect(address, num_cpus, memory_mb)
    if timings is not None:
        timings["ray_start"] = round(time.perf_counter() - clock, 3)
    try:
        yield ray
    finally:
        if opened:
            disconnect(ray, timings)
        if early is not None:
            early.released.set()


def disconnect(ray: Any, timings: dict[str, float] | None = None) -> None:
    """Leave the cluster; a local instance this process started stops (`timings['ray_stop']`:
    its seconds)."""
    global _LOCAL_ENV
    clock = time.perf_counter()
    try:
        ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - the run's work is done; a stray process is not fatal
        log.warning("stopping Ray failed: %s: %s", type(exc).__name__, exc)
    _LOCAL_ENV = None
    if timings is not None:
        timings["ray_stop"] = round(time.perf_counter() - clock, 3)


#: Ray's own setting (an environment variable a user may set) for how many worker processes
#: a node keeps alive when idle
SOFT_LIMIT_VAR = "RAY_num_workers_soft_limit"


def _keep_workers(num_cpus: int | None) -> dict[str, Any]:
    """A new local instance keeps as many idle worker processes as its CPUs can run stages
    at once (each task or actor holds at least RAY_TASK_CPUS or RAY_ACTOR_CPUS of a CPU).
    Ray's default keeps one per CPU and stops the others after a second idle; the parse and
    write tasks then start and import everything again, shard after shard, in new processes
    (measured on 2 CPUs, 40 shards: 12 worker processes instead of 7, and the pipeline stage
    took 14.9 to 19.7 s over four runs instead of 14.2 and 14.4). A user's
    RAY_num_workers_soft_limit is kept."""
    if SOFT_LIMIT_VAR in os.environ:
        return {}
    cpus = num_cpus or os.cpu_count() or 1
    most = math.ceil(cpus / min(RAY_ACTOR_CPUS, RAY_TASK_CPUS))
    return {"_system_config": {"num_workers_soft_limit": most}}


_SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")


def worker_env() -> dict[str, str]:
    """The driver's lanceflow, Prefect, Hugging Face and Lance read-ahead settings, for the
    workers (a remote cluster's workers do not share this environment). Secrets are never put
    in a runtime environment (Ray shows those): keys travel inside the job, or come from the
    cluster's own environment."""
    prefixes = (
        "LANCEFLOW_",
        "PREFECT_API_URL",
        "HF_",
        "TRANSFORMERS_OFFLINE",
        LANCE_IO_BUFFER_VAR,  # a user's read-ahead setting (tasks.memory)
    )
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(prefixes)
        and not any(w in k.upper() for w in _SECRET_WORDS)
        and "@" not in v  # a URL with credentials in it
    }


def stage_runtime_env() -> dict[str, Any] | None:
    """The runtime env the pipeline's stages need. None on a local instance this process
    started while worker_env() is what its workers inherited at the start: the stages then run
    in the workers Ray started with the instance (a stage with a runtime env of its own gets
    new workers, each started and importing everything a second time: seconds of CPU that, on
    a small machine, the pipeline's first shards wait for). Otherwise the variables, which a
    cluster's workers (or a local instance's, after a variable changed) do not have."""
    ray = _import_ray()
    env = worker_env()
    if _LOCAL_ENV == (ray.get_runtime_context().get_session_name(), env):
        return None
    return {"env_vars": env}


def shard_refs(ray: Any, batches: Iterator[list[dict[str, Any]]]) -> list[Any]:
    """The plan's batches as object-store refs of one-row tables (one shard each)."""
    refs = []
    for items in batches:
        blob = pa.array([pickle.dumps(items, protocol=5)], pa.large_binary())
        refs.append(ray.put(pa.table({"items": blob})))
    return refs


def run_pipeline(
    job: RayJob,
    batches: Iterator[list[dict[str, Any]]],
    *,
    workers: int,
    gpus_per_worker: float = 0.0,
    on_shard: Any = None,
    stage_seconds: dict[str, float] | None = None,
) -> tuple[list[str], str, int, int, int]:
    """Run the Ray Data pipeline over the plan's batches.

    Returns (fragment JSONs, path of the spilled outcomes, embedded, cached, chunks). Outcomes
    are spilled to a local file as results arrive (the driver's memory does not grow with the
    corpus); fragments are small metadata records.
    """
    params = job.params
    timings = {} if stage_seconds is None else stage_seconds
    ray = connect(params.ray_address, params.ray_cpus, params.ray_memory)  # the session's
    clock = time.perf_counter()
    import ray.data as rd

    refs = shard_refs(ray, batches)
    if not refs:
        return [], "", 0, 0, 0
    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    # blocks in flight (chunks, vectors) within a fixed budget whatever the corpus size:
    # Ray Data's backpressure holds the parsers back when the embedders fall behind
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=params.ray_memory * 2**20
    )
    # every stage: one shard per call, Arrow in and out, the driver's settings in the env
    stage: dict[str, Any] = {"batch_size": 1, "batch_format": "pyarrow"}
    runtime_env = stage_runtime_env()
    if runtime_env is not None:
        stage["runtime_env"] = runtime_env
    tasks = {**stage, "fn_kwargs": {"job": job}, "num_cpus": RAY_TASK_CPUS}
    ds: Any = rd.from_arrow_refs(refs)
    ds = ds.map_batches(parse_and_chunk, **tasks)
    ds = ds.map_batches(
        EmbedWorker,
        **stage,
        fn_constructor_kwargs={"job": job},
        compute=rd.ActorPoolStrategy(size=workers),
        num_cpus=RAY_ACTOR_CPUS,
        num_gpus=gpus_per_worker or None,
        # a killed actor is restarted and its shard run again; an actor that dies the same
        # way every time (a shard that runs it out of memory) fails the run
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_RESTARTS,
    )
    ds = ds.map_batches(write_fragments, **tasks)
    spill_dir = scratch_dir("ray")
    spill = os.path.join(spill_dir, "outcomes.pickle")
    fragments: list[str] = []
    embedded = cached = chunks = 0
    ok = False
    try:
        with open(spill, "wb") as fh:
            for row in ds.iter_rows():
                fragments.extend(row["fragments"])
                fh.write(row["outcomes"])
                embedded += int(row["embedded"])
                cached += int(row["cached"])
                chunks += int(row["chunks"])
                if on_shard is not None:
                    on_shard(pickle.loads(row["outcomes"]))
        ok = True
        timings["pipeline"] = round(time.perf_counter() - clock, 3)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Ray Data stages:\n%s", ds.stats())
    except LanceflowError:
        raise
    except Exception as exc:
        from tasks.storage import redact_text

        why = redact_text(f"{type(exc).__name__}: {exc}", job.storage_options)
        raise RayRunnerError(
            f"the Ray pipeline failed, nothing was committed (a re-run starts over): {why}"
        ) from None
    finally:
        if not ok:
            import shutil

            shutil.rmtree(spill_dir, ignore_errors=True)
    return fragments, spill, embedded, cached, chunks


def ingest_on_ray(run: Any, plan: Any) -> RayResult:
    """The Ray runner's coarse step for one IngestRun: pipeline, one commit, then the
    manifest rows and the long documents. Report counts are merged into run.report."""
    from tasks.embedding import resolved_api_key
    from tasks.plan import iter_work
    from tasks.runs import stream_one
    from tasks.store import TableModel, lance_of, table_options, write_uri

    params: IngestParams = run.params
    store = run.store
    if not store.has_chunks():
        # the workers write data files into the table: it must exist with its schema first
        dim = run.fingerprint.dimension or run.embedder.dimension
        store.chunks(TableModel(run.fingerprint.model, dim, params.embedder.kind))
    elif run.fingerprint.dimension is not None:
        store.check_dimension(run.fingerprint.model, run.fingerprint.dimension)
    tbl = store.chunks_table()
    options = table_options(params.store.uri, params.store.access)
    lance_ds = lance_of(tbl, store.cache_size)
    dataset_uri = write_uri(params.store.uri, lance_ds.uri)  # s3+ddb keeps its commit store
    file_version = lance_ds.data_storage_version
    had_rows = tbl.count_rows() > 0
    api_key = resolved_api_key(params.embedder)
    if params.embedder.kind == "openai":
        # the account's limits are shared by the actors: each starts with its share (and
        # learns the account's real remaining budget from the response headers)
        e = params.embedder
        params = params.model_copy(
            update={
                "embedder": e.model_copy(
                    update={
                        "rpm": max(1, e.rpm // params.ray_workers),
                        "tpm": max(1, e.tpm // params.ray_workers),
                        "max_concurrency": max(1, e.max_concurrency // params.ray_workers),
                    }
                )
            }
        )
    src = params.source
    if src.credentials_block:
        # read the block here: the workers get its values inside the job, not a block name
        from tasks.storage import fsspec_options, protect

        resolved = fsspec_options(src.uri, src.storage_options, src.credentials_block)
        update = {"storage_options": protect(resolved), "credentials_block": None}
        params = params.model_copy(update={"source": src.model_copy(update=update)})
    job = RayJob(
        params=params,
        generation=run.target,
        cache_tables=tuple(run.cache_tables),
        source_uri=run.source_uri,
        dataset_uri=dataset_uri,
        storage_options=options or None,
        job_id=run.report.run_id,
        api_key=api_key,
        data_storage_version=file_version,
    )
    batches = iter_work(plan, params.batch_docs, int(params.batch_mb * 2**20))
    timings = run.report.stage_seconds
    # the commit and the rest of the run are the driver's: a local instance stops first
    with ray_session(params.ray_address, params.ray_cpus, params.ray_memory, timings):
        fragments, spill, embedded, cached, chunks = run_pipeline(
            job,
            batches,
            workers=params.ray_workers,
            gpus_per_worker=params.ray_gpus_per_worker,
            stage_seconds=timings,
        )
    clock = time.perf_counter()
    result = RayResult(embedded=embedded, cached=cached, fragments=len(fragments))
    try:
        # a table that had rows: the new chunks replace their documents' (all of them: a
        # crashed earlier run may have committed chunks of documents still 'new')
        done = commit_spilled(
            run, dataset_uri, options or None, fragments, spill, chunks, replace_old=had_rows
        )
        result.version_before, result.version_after = done.version_before, done.version_after
        result.streamed = done.streamed
        run.report.chunks.embedded += embedded
        run.report.chunks.cached += cached
        run.report.stage_seconds["commit"] = round(time.perf_counter() - clock, 3)
    finally:
        if spill:
            import shutil

            shutil.rmtree(os.path.dirname(spill), ignore_errors=True)
    for o in result.streamed:  # long documents, a segment at a time, on the driver
        run.report.merge(stream_one(run, o))
    return result
