"""Measuring commands side by side: alternated runs, wall and CPU time, peak RSS of the process tree."""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from corpus import REPO


@dataclass(frozen=True)
class Run:
    wall_s: float
    cpu_s: float  # user + system of the command and all its children
    peak_rss: int  # bytes, the peak of the summed RSS of the process tree (iotscan meters in a child)


def measure(cmd: list[str], cwd: Path = REPO) -> Run:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr.read().decode()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(wall, cpu, peak)


def alternate(variants: dict[str, list[str]], runs: int, cwds: dict[str, Path] | None = None,
              after: Callable[[str], None] | None = None) -> dict[str, list[Run]]:
    """Run every variant `runs` times, rotating which goes first, so load changes hit all alike (``cwds``: where a
    variant runs, when not in this checkout; ``after``: called with a variant's name after each of its runs)."""
    names = list(variants)
    results: dict[str, list[Run]] = {n: [] for n in names}
    width = max(map(len, names))
    for i in range(runs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            run = measure(variants[name], (cwds or {}).get(name, REPO))
            results[name].append(run)
            if after is not None:
                after(name)
            print(f"  run {i + 1} {name:{width}s} {run.wall_s:7.2f} s wall {run.cpu_s:7.2f} s cpu "
                  f"{run.peak_rss / 2**20:7.1f} MiB", flush=True)
    return results


def packets_in(capture: Path) -> int:
    out = subprocess.run(["capinfos", "-T", "-r", "-c", str(capture)], capture_output=True, text=True).stdout
    return int(out.split("\t")[1])
