"""Run a command and sample its whole process tree (the benchmarks' shared measurement).

run_tree() starts the command (optionally pinned to some cores, which every child inherits)
and samples its process tree from a thread at the lowest priority until it exits: the
tree's summed RSS every 0.1 s (the peak and when it was sampled), its PSS every 2 s, and,
once a second, the list of its processes with each one's CPU seconds, by role ('cli' for the
command itself, else the first words of a process's command line). On a machine whose cores
the command keeps busy, a sampler that listed the tree and read every process's CPU times
each 0.1 s at the normal priority took about 10 % of a core from the run it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent


def _role(p: Any, root_pid: int) -> str:
    if p.pid == root_pid:
        return "cli"
    try:
        args = p.cmdline()[:4]
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return "?"
    # the program and its script or module, without folders or options: "python
    # default_worker.py" (Ray's workers), "python -m uvicorn" (Prefect's server), "raylet"
    if args and args[0].startswith("ray::"):
        # a Ray worker titles itself by what it runs ('ray::IDLE', 'ray::MapWorker(...)')
        # once started: one role for all of them, whenever the sampler first saw them
        return "python default_worker.py"
    words = [Path(w).name for w in args if not w.startswith("--")]
    return " ".join(words[:3])[:60] or "?"


class TreeRun(NamedTuple):
    seconds: float  # wall
    peak: int  # the tree's peak RSS, bytes
    peak_pss: int  # the tree's peak PSS (shared pages divided among their sharers), bytes
    peak_at: float  # seconds from the start
    stdout: str
    peak_by_role: dict[str, float]  # GiB
    cpu_by_role: dict[str, float]  # CPU seconds (user + system) each role used
    sampler_cpu_s: float  # CPU seconds the sampling took


def run_tree(
    cmd: list[str],
    env: dict[str, str],
    cores: int | None = None,
    trace: Path | None = None,
) -> TreeRun:
    """Run `cmd` (pinned to the first `cores` cores when given), sampling its process tree
    every 0.1 s: wall seconds, the tree's peak RSS and when, stdout, and each role's peak RSS
    and CPU seconds. With `trace`, one JSON line per second there: seconds, the tree's RSS, the
    command's own RSS and file-backed share (MiB), and each role's CPU seconds so far, so a
    peak or an idle core can be placed in the run."""
    pin = None
    if cores is not None:
        allowed = sorted(os.sched_getaffinity(0))[:cores]

        def pin() -> None:
            os.sched_setaffinity(0, allowed)

    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
        text=True,
        preexec_fn=pin,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.append(proc.stdout.read())),  # type: ignore[union-attr]
        threading.Thread(target=lambda: err.append(proc.stderr.read())),  # type: ignore[union-attr]
    ]
    for r in readers:
        r.start()
    samples = _Samples()
    sampler = threading.Thread(target=_sample, args=(proc, t, trace, samples))
    sampler.start()
    sampler.join()
    for r in readers:
        r.join()
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write("".join(err)[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    peaks = {pid: value / 2**30 for pid, value in samples.own_peak.items()}
    return TreeRun(
        seconds,
        samples.peak,
        samples.peak_pss,
        samples.peak_at,
        "".join(out),
        _by_role(peaks, samples.roles, 3),
        _by_role(samples.own_cpu, samples.roles, 1),
        round(samples.cpu_s, 1),
    )


@dataclass
class _Samples:
    peak: int = 0
    peak_at: float = 0.0
    peak_pss: int = 0
    own_peak: dict[int, int] = field(default_factory=dict)
    own_cpu: dict[int, float] = field(default_factory=dict)
    roles: dict[int, str] = field(default_factory=dict)
    cpu_s: float = 0.0  # the sampling thread's own CPU seconds


def _sample(proc: subprocess.Popen[str], t: float, trace: Path | None, out: _Samples) -> None:
    """Sample `proc`'s process tree until it exits, into `out` (see run_tree)."""
    import psutil

    _lower_own_priority()
    clock = time.thread_time()
    root = psutil.Process(proc.pid)
    peak = 0
    peak_at = 0.0
    peak_pss = 0
    next_pss = 0.0
    next_list = 0.0
    procs: list[psutil.Process] = []
    own_peak, own_cpu, roles = out.own_peak, out.own_cpu, out.roles
    trace_out = trace.open("w") if trace is not None else None
    next_trace = 0.0
    while proc.poll() is None:
        now = time.perf_counter() - t
        # the sampler's own CPU comes out of the cores the run is pinned to when it has them
        # all (2 workers on 2 cores): the process list (a scan of every /proc entry) and
        # the CPU times once a second, PSS (a walk of each process's page tables) every 2 s;
        # only the RSS, which a peak is read from, every 0.1 s
        listing = now >= next_list
        if listing:
            next_list = now + 1.0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                total += rss
                own_peak[p.pid] = max(own_peak.get(p.pid, 0), rss)
                if listing:
                    times = p.cpu_times()
                    own_cpu[p.pid] = times.user + times.system
                    if p.pid not in roles:
                        roles[p.pid] = _role(p, proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if total > peak:
            peak, peak_at = total, now
        if now >= next_pss:
            next_pss = now + 2.0
            pss = 0
            for p in procs:
                try:
                    pss += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peak_pss = max(peak_pss, pss)
        if trace_out is not None and listing and now >= next_trace:
            next_trace = now + 1.0
            try:
                mine = root.memory_info()
                cli = {"cli_mib": mine.rss // 2**20, "cli_file_mib": mine.shared // 2**20}
            except psutil.NoSuchProcess:
                cli = {}
            cpu = _by_role(own_cpu, roles, 1)
            line = {"s": round(now, 1), "tree_mib": total // 2**20, **cli, "cpu_s": cpu}
            trace_out.write(json.dumps(line))
            trace_out.write("\n")
            trace_out.flush()
        time.sleep(0.1)
    if trace_out is not None:
        trace_out.close()
    out.peak, out.peak_at, out.peak_pss = peak, peak_at, peak_pss
    out.cpu_s = time.thread_time() - clock


def _lower_own_priority() -> None:
    """The sampling thread at the lowest priority (Linux niceness is per thread; the command,
    started before, keeps its own): on the run's own cores it yields to the run."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _by_role(values: dict[int, float], roles: dict[int, str], digits: int) -> dict[str, float]:
    """Per-process values summed by role, largest first."""
    out: dict[str, float] = {}
    for pid, value in values.items():
        role = roles.get(pid, "?")
        out[role] = out.get(role, 0.0) + value
    return {k: round(v, digits) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}
