"""What the live view's snapshots of the busiest active flows cost the meter, side by side.

    python benchmarks/bench_live_view.py [--runs 5]

The main pass's meter (as `iotscan live` runs it: statistics and early packets for scoring) reads two
captures with and without snapshots (MeterConfig.active_every_ms = 1000), alternately; the reader only
counts. A snapshot is paced by capture time, so on a file the meter takes as many as it would watching the
same traffic at its own pace on an interface: one per second of the capture.

* the ~1M-packet nDPI corpus capture (corpus.py): ordinary traffic, a few flows active per second;
* a spoofed SYN flood of a million one-packet flows at 20,000 packets/s (flood.py): every snapshot looks at
  the 20,000 flows of its second (the default --max-flows keeps 100,000), the worst case short of the scan
  limit.

Reported: the meter process's CPU time (the child's user + system, from getrusage) and wall time, medians;
the snapshots taken; and what each cost (the CPU difference divided by their number).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import REPO, build
from flood import build as build_flood

sys.path.insert(0, str(REPO))
from iotscan.capture.source import FlowSource
from iotscan.cli.common import main_pass_config

UNIT_COPIES = 13  # the analyze benchmark's ~1M-packet capture


def meter(capture: Path, every_ms: int) -> tuple[float, float, int, int]:
    """Wall and meter CPU seconds, flows and snapshots seen, for one pass over the capture."""
    config = replace(main_pass_config(str(capture), score=True), active_every_ms=every_ms)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    source = FlowSource(config)
    flows = sum(1 for _ in source)
    snapshots = source.snapshots
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, flows, snapshots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=("corpus", "flood"), help="one of the two captures")
    args = parser.parse_args()
    captures = {}
    if args.only != "flood":
        captures["nDPI corpus, 1M packets"] = build(UNIT_COPIES)
    if args.only != "corpus":
        captures["SYN flood, 1M flows"] = build_flood()
    rows = []
    for name, capture in captures.items():
        print(f"{name}: {capture}", flush=True)
        results: dict[int, list[tuple[float, float, int, int]]] = {0: [], 1000: []}
        for i in range(args.runs):
            for every in ((0, 1000) if i % 2 == 0 else (1000, 0)):
                run = meter(capture, every)
                results[every].append(run)
                print(f"  run {i + 1} snapshots {'on ' if every else 'off'} {run[0]:6.2f} s wall {run[1]:6.2f} s "
                      f"meter cpu, {run[2]:,} flows, {run[3]:,} snapshots seen", flush=True)
        off_cpu = statistics.median(r[1] for r in results[0])
        on_cpu = statistics.median(r[1] for r in results[1000])
        off_wall = statistics.median(r[0] for r in results[0])
        on_wall = statistics.median(r[0] for r in results[1000])
        taken = max(r[3] for r in results[1000])
        rows.append((name, off_cpu, on_cpu, off_wall, on_wall, taken))
    print("\n| capture | meter CPU, off | on | difference | wall, off | on | snapshots | CPU per snapshot |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, off_cpu, on_cpu, off_wall, on_wall, taken in rows:
        per = (on_cpu - off_cpu) / taken * 1000 if taken else float("nan")
        print(f"| {name} | {off_cpu:.2f} s | {on_cpu:.2f} s | {100 * (on_cpu / off_cpu - 1):+.1f}% | "
              f"{off_wall:.2f} s | {on_wall:.2f} s | {taken:,} | {per:.2f} ms |")


if __name__ == "__main__":
    main()
