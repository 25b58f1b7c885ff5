"""iotscan analyze vs a bare NFStreamer loop, side by side on the same ~1M-packet capture.

    python benchmarks/bench_analyze.py [--runs 3] [--no-scaling] [--against DIR] [--flood-runs 3] [--flood-only]

Runs alternate between the variants (these machines are noisy, so compare medians measured in one
run, not times across runs). Peak RSS is the peak of the summed RSS of the whole process tree
(iotscan and NFStream both meter in a child process). The scaling part runs each tool once on the
capture and on one ten times as long, to show memory follows active flows, not capture length,
then on a synthetic flood of a million one-packet flows (flood.py): bare NFStream, and iotscan analyze with
--flood-records summary (the default) and all, alternated (--flood-runs), with the records written and the flows
counted. --against DIR adds `iotscan analyze` run from another checkout (its iotscan/ and models/) to the
ordinary capture's variants, for the ratio of medians side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, measure, packets_in
from corpus import OUT, REPO, build
from flood import build as build_flood

PY = sys.executable
UNIT_COPIES = 13  # 13 copies of the ~78k-packet corpus: about 1M packets


def iotscan_cmd(capture: Path, *extra: str) -> list[str]:
    return [PY, "-m", "iotscan", "analyze", str(capture), "--format", "ndjson", "--output", "/dev/null",
            "--quiet", *extra]


def on_capture(cmd: list[str], capture: Path, other: Path) -> list[str]:
    """The same command, run on another capture."""
    return [str(other) if a == str(capture) else a for a in cmd]


def variants(capture: Path, splt: int) -> dict[str, list[str]]:
    """The commands compared; stage switches that this iotscan does not have yet are left out."""
    help_text = subprocess.run([PY, "-m", "iotscan", "analyze", "--help"], capture_output=True, text=True,
                               cwd=REPO).stdout
    out = {"bare NFStream": [PY, str(REPO / "benchmarks" / "bare_nfstream.py"), str(capture), "--splt", str(splt)]}
    no_risks = ["--no-risks"] if "--no-risks" in help_text else []
    off = [flag for flag in ("--no-devices", "--no-score") if flag in help_text]
    if off:
        out["iotscan flows only"] = iotscan_cmd(capture, *off, *no_risks)
    if "--no-score" in help_text and "--no-devices" in help_text:
        out["iotscan + devices"] = iotscan_cmd(capture, "--no-score", *no_risks)
    if "--no-hosts" in help_text:
        out["analyze --no-hosts"] = iotscan_cmd(capture, "--no-hosts", *no_risks)
    if no_risks:
        out["analyze --no-risks"] = iotscan_cmd(capture, *no_risks)
    out["iotscan analyze"] = iotscan_cmd(capture)
    if "--report" in help_text:  # the HTML report built beside the records (matplotlib draws at the end)
        out["analyze --report"] = iotscan_cmd(capture, "--report", str(OUT / "bench-report.html"))
    if "--baseline" in help_text:  # every flow scored against a baseline learnt from the same capture
        baseline = OUT / f"{capture.stem}.baseline.json"
        if not baseline.exists():
            OUT.mkdir(exist_ok=True)
            subprocess.run([PY, "-m", "iotscan", "baseline", "learn", str(capture), "-o", str(baseline), "-q"],
                           check=True, cwd=REPO)
        out["analyze --baseline"] = iotscan_cmd(capture, "--baseline", str(baseline))
    return out


def flood_bench(runs: int, splt: int) -> dict:
    """The million-flow spoofed SYN flood: bare NFStream, iotscan analyze with --flood-records summary and all,
    alternated; wall and CPU time, summed peak RSS, records written and flows counted (from the summary)."""
    flood = build_flood()
    print(f"\nhostile input: {flood.name}, a spoofed SYN flood of 1M one-packet flows; {runs} alternated runs")
    out = {name: OUT / f"flood-{name.split()[-1]}.ndjson" for name in ("summary", "all")}
    cmds = {"bare NFStream": [PY, str(REPO / "benchmarks" / "bare_nfstream.py"), str(flood), "--splt", str(splt)]}
    for mode, path in out.items():
        cmds[f"iotscan analyze {mode}"] = [PY, "-m", "iotscan", "analyze", str(flood), "--format", "ndjson", "--output",
                                           str(path), "--quiet", "--flood-records", mode]
    written: dict[str, list[tuple[int, dict]]] = {name: [] for name in cmds}

    def count(name: str) -> None:  # the records written and the summary, then the file goes (1 GB with `all`)
        path = out.get(name.split()[-1])
        if path is not None and name.startswith("iotscan"):
            lines, last = 0, b""
            with path.open("rb") as f:
                for line in f:
                    lines, last = lines + 1, line
            written[name].append((lines, json.loads(last)))
            path.unlink()

    runs_of = alternate(cmds, runs, after=count)
    results = {}
    print(f"{'variant':26s} {'median s':>9s} {'cpu s':>7s} {'peak RSS':>10s} {'records':>11s} {'flows':>11s} "
          f"{'folded':>9s}")
    for name, measured in runs_of.items():
        t = statistics.median(r.wall_s for r in measured)
        c = statistics.median(r.cpu_s for r in measured)
        m = statistics.median(r.peak_rss for r in measured)
        entry = {"median_s": round(t, 2), "median_cpu_s": round(c, 2), "peak_rss_mib": round(m / 2**20),
                 "times_s": [round(r.wall_s, 2) for r in measured],
                 "peak_rss_mib_runs": [round(r.peak_rss / 2**20) for r in measured]}
        records = flows = folded = ""
        if written[name]:
            lines, summary = written[name][-1]
            entry.update(records_written=lines, flows_counted=summary["flows"],
                         folded_flows=summary.get("folded_flows", 0), floods=summary.get("floods", 0))
            records, flows, folded = f"{lines:,}", f"{summary['flows']:,}", f"{summary.get('folded_flows', 0):,}"
        results[name] = entry
        print(f"{name:26s} {t:9.1f} {c:7.1f} {m / 2**20:6.0f} MiB {records:>11s} {flows:>11s} {folded:>9s}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-scaling", action="store_true", help="skip the 10x-length memory check")
    parser.add_argument("--against", type=Path, help="another checkout whose iotscan analyze runs beside this one's")
    parser.add_argument("--flood-runs", type=int, default=1, help="alternated runs of each variant on the flood")
    parser.add_argument("--flood-only", action="store_true", help="only the flood (no nDPI corpus needed)")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="only these variants (and bare NFStream), e.g. 'iotscan analyze' 'analyze --baseline'")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from iotscan.cli.common import main_pass_config

    splt = main_pass_config("", score=True).splt  # the bare loop meters as iotscan's full main pass does
    if args.flood_only:
        results = {"flood": flood_bench(args.flood_runs, splt)}
        OUT.mkdir(exist_ok=True)
        (OUT / "results-flood.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {OUT / 'results-flood.json'}")
        return

    capture = build(UNIT_COPIES)
    packets = packets_in(capture)
    cmds = variants(capture, splt)
    if args.variants:
        cmds = {n: c for n, c in cmds.items() if n == "bare NFStream" or n in args.variants}
    cwds = {}
    if args.against is not None:
        cmds["analyze (other checkout)"] = cmds["iotscan analyze"]
        cwds["analyze (other checkout)"] = args.against.resolve()
    names = list(cmds)
    print(f"capture {capture.name}: {packets:,} packets; {args.runs} alternated runs per variant")
    runs = alternate(cmds, args.runs, cwds)
    times = {n: [r.wall_s for r in runs[n]] for n in names}
    rss = {n: [r.peak_rss for r in runs[n]] for n in names}
    cpu = {n: [r.cpu_s for r in runs[n]] for n in names}

    base_t = statistics.median(times["bare NFStream"])
    base_m = statistics.median(rss["bare NFStream"])
    results = {"capture": capture.name, "packets": packets, "runs": args.runs, "variants": {}}
    print(f"\n{'variant':22s} {'median s':>9s} {'packets/s':>11s} {'throughput':>11s} {'cpu s':>7s} "
          f"{'peak RSS':>12s} {'RSS':>6s}")
    for name in names:
        t, m, c = statistics.median(times[name]), statistics.median(rss[name]), statistics.median(cpu[name])
        results["variants"][name] = {"median_s": round(t, 3), "packets_per_s": round(packets / t),
                                     "throughput_vs_bare": round(base_t / t, 3), "median_cpu_s": round(c, 3),
                                     "peak_rss_mib": round(m / 2**20, 1), "rss_vs_bare": round(m / base_m, 3),
                                     "times_s": [round(x, 3) for x in times[name]]}
        print(f"{name:22s} {t:9.2f} {packets / t:11,.0f} {base_t / t:10.2f}x {c:7.1f} {m / 2**20:8.1f} MiB "
              f"{m / base_m:5.2f}x")

    # What each stage adds, against the variant without it (the issues' budgets: devices 10%, scoring 15% with
    # the host stage in it, risks 5%, baseline 10%).
    results["stage_overheads"] = {}
    scored = "analyze --no-risks" if "analyze --no-risks" in times else "iotscan analyze"
    for stage, without, with_ in (("devices", "iotscan flows only", "iotscan + devices"),
                                  ("scoring", "iotscan + devices", scored),
                                  ("hosts", "analyze --no-hosts", scored),
                                  ("risks", "analyze --no-risks", "iotscan analyze"),
                                  ("report", "iotscan analyze", "analyze --report"),
                                  ("baseline", "iotscan analyze", "analyze --baseline")):
        if without in times and with_ in times:
            t0, t1 = statistics.median(times[without]), statistics.median(times[with_])
            c0, c1 = statistics.median(cpu[without]), statistics.median(cpu[with_])
            results["stage_overheads"][stage] = {"wall": round(t1 / t0 - 1, 3), "cpu": round(c1 / c0 - 1, 3)}
            print(f"{stage} add {100 * (t1 / t0 - 1):+.1f}% wall, {100 * (c1 / c0 - 1):+.1f}% cpu "
                  f"({with_} vs {without})")
    if args.against is not None:
        t0, t1 = statistics.median(times["analyze (other checkout)"]), statistics.median(times["iotscan analyze"])
        c0, c1 = statistics.median(cpu["analyze (other checkout)"]), statistics.median(cpu["iotscan analyze"])
        results["vs_other_checkout"] = {"checkout": str(args.against), "wall_ratio": round(t1 / t0, 3),
                                  "cpu_ratio": round(c1 / c0, 3)}
        print(f"this checkout vs {args.against}: {t1 / t0:.3f}x wall, {c1 / c0:.3f}x cpu (ratios of medians)")

    if not args.no_scaling:
        long_capture = build(UNIT_COPIES * 10)
        print(f"\nscaling: peak RSS on {capture.name} vs {long_capture.name} (10x the same traffic)")
        results["scaling"] = {}
        for name in ("bare NFStream", "iotscan analyze"):
            short_cmd = cmds[name]
            long_cmd = on_capture(short_cmd, capture, long_capture)
            m1 = measure(short_cmd).peak_rss
            m10 = measure(long_cmd).peak_rss
            results["scaling"][name] = {"peak_rss_1x_mib": round(m1 / 2**20, 1),
                                        "peak_rss_10x_mib": round(m10 / 2**20, 1),
                                        "ratio_10x_over_1x": round(m10 / m1, 3)}
            print(f"{name:22s} 1x {m1 / 2**20:7.1f} MiB   10x {m10 / 2**20:7.1f} MiB   ratio {m10 / m1:.2f}")

        results["flood"] = flood_bench(args.flood_runs, splt)

    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at the end: {results['load_average']}")
    OUT.mkdir(exist_ok=True)
    (OUT / "results-analyze.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {OUT / 'results-analyze.json'}")


if __name__ == "__main__":
    main()
