"""Many captures: `iotscan analyze` in one process against `--jobs N` (a local Dask cluster), side by side.

1. Throughput: a corpus of real captures (the nDPI corpus and the shared datasets, every k-th file to reach
   --captures) analysed serially and with --jobs N, alternated runs, medians of wall time; the ratio of the
   throughputs, the CPU each took, and the load average of the machine during the runs (this machine is shared:
   rerun on a quiet one for a figure that is the tool's alone).
2. Records: the last serial and parallel outputs compared record for record (each capture's records in their
   order, devices and summary equal but for timings and the workers field).
3. Client memory: --rss-captures small captures (a sample rewritten with shifted times) through --jobs N; the
   peak RSS of the client process alone (not its workers) at each count.

    .venv/bin/python benchmarks/bench_scale.py                 # about 20 minutes on 2 busy cores
    .venv/bin/python benchmarks/bench_scale.py --captures 200 --runs 3 --rss-captures 200,2000
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
from corpus import REPO

SHARED = REPO.parent / "shared"
OUT = REPO / "benchmarks" / "out" / "scale"
TIMINGS = ("elapsed_s", "packets_per_s", "workers")


def corpus_files(count: int) -> list[Path]:
    """Every k-th capture file of the nDPI corpus and the shared datasets, ``count`` of them (or all there are)."""
    found = []
    for folder in (SHARED / "pcaps" / "ndpi", SHARED / "datasets"):
        if not folder.is_dir():
            raise SystemExit(f"{folder} is absent: the benchmark needs the shared captures")
        found += sorted(p for p in folder.rglob("*") if p.suffix in (".pcap", ".pcapng", ".cap") and p.is_file())
    step = max(1, len(found) // count)
    return found[::step][:count]


def iotscan(*args: str) -> list[str]:
    return [sys.executable, "-m", "iotscan", "analyze", *args, "-f", "ndjson", "-q"]


def timed(cmd: list[str]) -> dict[str, float]:
    """Wall and CPU time (the command and all its children, workers included), and the load average around it."""
    before = os.times()
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    after = os.times()
    if proc.returncode not in (0, 2):  # 2: some inputs of the corpus are not analysable (reported, the rest goes on)
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr.decode()[-800:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load, "load_after": os.getloadavg()[0]}


def same_records(serial: Path, parallel: Path) -> str:
    """'identical', or what differs."""
    def load(path: Path) -> tuple[dict, list, dict]:
        by_source: dict[str, list[bytes]] = collections.defaultdict(list)
        devices, summary = [], {}
        for line in path.read_bytes().splitlines():
            record = orjson.loads(line)
            if record["event_type"] == "device":
                devices.append(line)
            elif record["event_type"] == "summary":
                summary = {k: v for k, v in record.items() if k not in TIMINGS}
            else:
                by_source[record.get("source")].append(line)
        return by_source, devices, summary

    a, b = load(serial), load(parallel)
    if a[0] != b[0]:
        differ = [s for s in set(a[0]) | set(b[0]) if a[0].get(s) != b[0].get(s)]
        return f"records of {len(differ)} captures differ, e.g. {differ[:3]}"
    if a[1] != b[1]:
        return "device records differ"
    if a[2] != b[2]:
        return "summaries differ: " + ", ".join(k for k in a[2] if a[2][k] != b[2].get(k))
    flows = sum(len(v) for v in a[0].values())
    return f"identical ({flows:,} records of {len(a[0]):,} captures, {len(a[1])} devices, summary)"


def small_captures(folder: Path, count: int) -> Path:
    """``count`` captures of a sample's traffic, each shifted a minute after the previous one."""
    folder.mkdir(parents=True, exist_ok=True)
    data = (REPO / "samples" / "tplink-hs110-setup.pcap").read_bytes()
    header, packets, offset = data[:24], [], 24
    while offset + 16 <= len(data):
        sec, usec, length, orig = struct.unpack_from("<IIII", data, offset)
        packets.append((sec, usec, orig, data[offset + 16: offset + 16 + length]))
        offset += 16 + length
    for i in range(count):
        path = folder / f"plug-{i:05d}.pcap"
        if not path.exists():
            path.write_bytes(header + b"".join(struct.pack("<IIII", sec + 60 * i, usec, len(frame), orig) + frame
                                               for sec, usec, orig, frame in packets))
    return folder


def client_peak_rss(cmd: list[str]) -> int:
    """The peak RSS of the command's own process (the client), not of its workers."""
    proc = psutil.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, proc.memory_info().rss)
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr.read().decode()[-800:]}")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captures", type=int, default=300, help="captures of the corpus (at least 200)")
    parser.add_argument("--runs", type=int, default=3, help="alternated runs of each variant")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rss-captures", default="200,2000", help="counts of small captures for the memory check "
                        "('' to skip it)")
    parser.add_argument("--rss-args", default="", help="analyze options of the memory check, e.g. '--no-score'")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict = {"jobs": args.jobs, "cores": os.cpu_count()}
    if not args.skip_throughput:
        files = corpus_files(args.captures)
        listing = OUT / "corpus.txt"
        listing.write_text("".join(f"{p}\n" for p in files))
        size = sum(p.stat().st_size for p in files)
        print(f"corpus: {len(files)} captures, {size / 2**20:.1f} MiB (listed in {listing})", flush=True)
        variants = {"serial": iotscan(*map(str, files), "-o", str(OUT / "serial.ndjson")),
                    f"--jobs {args.jobs}": iotscan(*map(str, files), "--jobs", str(args.jobs),
                                                   "-o", str(OUT / "parallel.ndjson"))}
        results: dict[str, list[dict]] = {name: [] for name in variants}
        names = list(variants)
        for i in range(args.runs):
            for name in names[i % 2:] + names[:i % 2]:
                run = timed(variants[name])
                results[name].append(run)
                print(f"  run {i + 1} {name:10s} {run['wall_s']:7.1f} s wall {run['cpu_s']:7.1f} s cpu  load "
                      f"{run['load_before']:.1f} -> {run['load_after']:.1f}", flush=True)
        medians = {name: statistics.median(r["wall_s"] for r in runs) for name, runs in results.items()}
        serial, parallel = medians["serial"], medians[f"--jobs {args.jobs}"]
        loads = [r[k] for runs in results.values() for r in runs for k in ("load_before", "load_after")]
        print("\n| variant | median wall | captures/s | MB/s | median CPU | throughput vs serial |\n"
              "|---|---:|---:|---:|---:|---:|")
        for name, wall in medians.items():
            cpu = statistics.median(r["cpu_s"] for r in results[name])
            print(f"| {name} | {wall:.1f} s | {len(files) / wall:.2f} | {size / 1e6 / wall:.2f} | {cpu:.1f} s | "
                  f"{serial / wall:.2f}x |")
        print(f"load average (1 min) during the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores")
        records = same_records(OUT / "serial.ndjson", OUT / "parallel.ndjson")
        print(f"records: {records}", flush=True)
        report.update(captures=len(files), bytes=size, runs=results, medians=medians, ratio=serial / parallel,
                      load=[min(loads), max(loads)], records=records)
    rss = {}
    for count in (int(c) for c in args.rss_captures.split(",") if c):
        folder = small_captures(OUT / "small" / str(count), count)
        rss[count] = client_peak_rss(iotscan(str(folder), "--jobs", str(args.jobs), *args.rss_args.split(), "-o",
                                             os.devnull))
        print(f"client peak RSS over {count:,} small captures (--jobs {args.jobs}): {rss[count] / 2**20:.1f} MiB",
              flush=True)
    report["client_peak_rss"] = rss
    (OUT / "bench_scale.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
