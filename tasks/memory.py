"""Keeping a long run's memory flat.

Lance reads ahead of a slow consumer until LANCE_DEFAULT_IO_BUFFER_SIZE bytes are in flight
(2 GiB by default, sized for object stores), so a full-table scan (the IVF-PQ build, the
compaction, a key index build) buffers up to that much of the table: the more rows, the more
memory. `bound_lance_io_buffer` sets 64 MiB unless the variable is set already.

LanceDB and its query engine allocate from many threads. glibc gives each thread up to 8 x
cores malloc arenas, and memory freed in one arena is not reused by another, so a run that
queries the table thousands of times (the embedding cache lookups) grows by megabytes per batch
although nothing is kept. Two arenas remove that growth (measured: 312 -> 266 MB after 40
lookup batches) at no measurable speed cost. Applied once per process, before the threads
start; a no-op off glibc or when MALLOC_ARENA_MAX is set already.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8
LANCE_IO_BUFFER_VAR = "LANCE_DEFAULT_IO_BUFFER_SIZE"
LANCE_IO_BUFFER_BYTES = 64 * 2**20
#: MiB in each of Lance's index and metadata caches of a connection that searches (search,
#: evaluation, `maintain`): a vector or full-text query over 1.46 M rows re-reads its index
#: partitions when they do not fit (benchmarks/search_cache.py, 64 -> 16 MiB: vector
#: 12.1 -> 29.8 ms, full text 13.2 -> 73.2 ms a query)
READ_CACHE_MB = 64
#: ... and of an ingest run's connection (the CLI's, a deployment's, a Ray worker's). A run's
#: lookups (the embedding cache, the documents manifest) touch each B-tree page about once,
#: and every commit adds a version whose manifest is cached, so the caches filled to their
#: bound during a large first run and held it through the index refresh: the 100k-document
#: run's peak RSS grew with the corpus (benchmarks/ray_scale.py, peak RSS at 100k documents
#: over 10k: 1.140 at 64 MiB, 1.080, 1.108 and 1.114 in three runs at 16 MiB; the pipeline 4
#: to 8 % slower). LANCEFLOW_LANCE_CACHE_MB sets both.
WRITE_CACHE_MB = 16
_done = False


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, found once (find_library runs ldconfig)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def limit_malloc_arenas(arenas: int = 2) -> bool:
    global _done
    if _done or not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    _done = True
    try:
        return bool(_libc().mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # musl, or no mallopt
        return False


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc `malloc_trim(0)`).

    The index refresh that ends a run makes LanceDB calls one after another, each with a large
    working set (the IVF-PQ build, the compaction) that it frees when done. glibc kept those
    freed pages, so a later call's peak stacked on them and the process kept them after the
    refresh (1.46 M rows: 563 MiB left; trimmed between the calls, 19-49 MiB, and a lower
    peak: benchmarks/index_memory.py). The pipeline trims after each batch's write too: a
    first run's RSS before the refresh, 30,000 generated documents, 567-571 MiB untrimmed and
    524 trimmed (benchmarks/ray_scale.py, 100k over 10k documents: 1.113 before, 1.085 and
    1.099 with it). About 5 ms a call, in the writing thread. A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):  # musl, or no malloc_trim
        return False


def bound_lance_io_buffer() -> str:
    """Cap the bytes Lance reads ahead in a scan (measured on the IVF-PQ build alone over
    1.46 M rows of 256 dimensions, in a fresh process: peak heap growth 522 MiB with Lance's
    2 GiB, 244 MiB with 64 MiB, no slower on local disk; benchmarks/index_memory.py measures
    the whole refresh). Lance reads the variable once per process, at its first scan, so
    this runs before any table is opened; an explicit setting wins (raise it for tables in
    object storage, where more reads in flight mean more throughput)."""
    return os.environ.setdefault(LANCE_IO_BUFFER_VAR, str(LANCE_IO_BUFFER_BYTES))
