"""How well device baselines detect a compromise, and how often they cry wolf: the figures of
models/baseline.card.md.

    python benchmarks/eval_baseline.py --lab LABRUNS [--oconnor DIR] [--mudscope DIR] [--kinds gauss iforest]

* the lab (``--lab``: directories made by ``iotscan lab generate DIR -s infection-normal,infection-mirai --seed
  S``, one per seed): a baseline learnt from the separate normal-only run, and one learnt from the normal phase
  of the infected run itself (cut with editcap at the phase's end), each scoring the infected run (its rest):
  whether the compromised device is alerted and how long after the first malicious flow began (the alert's
  ``decided_ms``: the end of the flow that showed it), which phases have a flow of that device at or above the
  threshold, and the anomaly alerts about other devices, or before the attack (false);
* the O'Connor lab's week-long captures (``--oconnor``): learnt over their first three days, scored on the
  rest: anomaly alerts per device-day, every alert being false (benign traffic);
* MUDscope's TP-Link lab (``--mudscope``), held out (nothing was tuned on it): learnt over the window before
  the attacks, scored on the window after them (benign: false alerts) and on the scan windows (is the plug's
  scan flagged?).

Scores use ``--no-score`` (the baseline stage does not read the classifier). Results go to
benchmarks/out/baseline-eval.json and are printed as markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
PY = sys.executable
THRESHOLD = 0.75
PHASES = ("bruteforce", "loader", "c2", "scan", "flood")


def iotscan(*args: Any, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    proc = subprocess.run([PY, "-m", "iotscan", *map(str, args)], capture_output=True, env=env, cwd=REPO)
    if check and proc.returncode not in (0, 1):
        raise SystemExit(f"iotscan {' '.join(map(str, args))}: {proc.stderr.decode()[-500:]}")
    return proc


def records(proc: subprocess.CompletedProcess[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def learn(paths: list[Path], out: Path, kind: str) -> None:
    iotscan("baseline", "learn", *paths, "-o", out, "--fresh", "--density-model", kind, "-q")


def score(paths: list[Path], baseline: Path) -> list[dict[str, Any]]:
    return records(iotscan("analyze", *paths, "--baseline", baseline, "--no-score", "-f", "ndjson", "-q"))


def editcap(src: Path, dst: Path, before_ms: int | None = None, after_ms: int | None = None) -> Path:
    args = ["editcap"]
    if after_ms is not None:
        args += ["-A", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(after_ms / 1000))]
    if before_ms is not None:
        args += ["-B", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(before_ms / 1000))]
    subprocess.run([*args, str(src), str(dst)], check=True, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"})
    return dst


# -- the lab ------------------------------------------------------------------------------------------------------


def _rules(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _phase_of(r: dict[str, Any], rules: list[dict[str, str]]) -> str | None:
    for rule in rules:
        if all(not rule[k] or str(r[k]) == rule[k] for k in ("src_ip", "dst_ip", "protocol", "dst_port")):
            family = rule["family"]
            if family == "c2":
                port = r["dst_port"] if r["src_ip"] == rule["src_ip"] else r["src_port"]
                return "loader" if port == 80 else "c2"
            return {"ddos": "flood"}.get(family, family)
    return None


def judge_lab(recs: list[dict[str, Any]], phases: list[dict[str, str]], rules: list[dict[str, str]]) -> dict[str, Any]:
    camera = phases[0]["host_mac"]
    attack_ms = int(next(p for p in phases if p["phase"] == "bruteforce")["start_ms"])
    flows = [r for r in recs if r["event_type"] == "flow"]
    malicious = [r for r in flows if _phase_of(r, rules)]
    first_bad = min((r["first_seen_ms"] for r in malicious), default=attack_ms)
    flagged: dict[str, bool] = dict.fromkeys(PHASES, False)
    for r in malicious:
        if camera in (r.get("src_device"), r.get("dst_device")) and (r.get("anomaly") or 0) >= THRESHOLD:
            flagged[_phase_of(r, rules) or ""] = True
    alerts = [a for a in recs if a["event_type"] == "alert" and a["kind"] == "anomaly"]
    on_camera = sorted(a["decided_ms"] for a in alerts if a["host_mac"] == camera and a["decided_ms"] >= first_bad)
    false = [a for a in alerts if a["host_mac"] != camera or a["decided_ms"] < first_bad]
    latency = (on_camera[0] - first_bad) / 1000 if on_camera else None
    return {"detected": latency is not None, "latency_s": latency, "within_60s": latency is not None and latency <= 60,
            "phases": flagged, "false_alerts": len(false),
            "false_examples": [a["message"][:160] for a in false[:3]],
            "new_devices": sum(a["kind"] == "new_device" for a in recs if a["event_type"] == "alert")}


def lab(runs: list[Path], kind: str, tmp: Path) -> dict[str, Any]:
    results = []
    for run in runs:
        normal, infected = run / "pcaps" / "infection-normal.pcap", run / "pcaps" / "infection-mirai.pcap"
        with open(run / "phases" / "infection-mirai.csv", newline="") as f:
            phases = list(csv.DictReader(f))
        rules = _rules(run / "rules" / "infection-mirai.csv")
        end_normal = int(phases[0]["end_ms"])
        b1 = tmp / f"{run.name}-{kind}-separate.json"
        learn([normal], b1, kind)
        separate = judge_lab(score([infected], b1), phases, rules)
        head = editcap(infected, tmp / f"{run.name}-head.pcap", before_ms=end_normal)
        rest = editcap(infected, tmp / f"{run.name}-rest.pcap", after_ms=end_normal)
        b2 = tmp / f"{run.name}-{kind}-same.json"
        learn([head], b2, kind)
        same = judge_lab(score([rest], b2), phases, rules)
        results.append({"run": run.name, "separate": separate, "same_run": same})
        print(f"  {run.name} {kind}: separate {_line(separate)}; same run {_line(same)}", flush=True)
    return {"runs": results, "summary": {p: _summary([r[p] for r in results]) for p in ("separate", "same_run")}}


def _line(j: dict[str, Any]) -> str:
    missed = [p for p, ok in j["phases"].items() if not ok]
    latency = f"{j['latency_s']:.1f} s" if j["latency_s"] is not None else "missed"
    return f"{latency}, phases missed {missed or '-'}, false alerts {j['false_alerts']}"


def _summary(js: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(js)
    latencies = [j["latency_s"] for j in js if j["latency_s"] is not None]
    return {"runs": n, "detected_within_60s": sum(j["within_60s"] for j in js),
            "median_latency_s": statistics.median(latencies) if latencies else None,
            "max_latency_s": max(latencies) if latencies else None,
            "phases_flagged": {p: sum(j["phases"][p] for j in js) for p in PHASES},
            "all_phases_flagged": sum(all(j["phases"].values()) for j in js),
            "false_alerts": sum(j["false_alerts"] for j in js)}


# -- long benign captures -----------------------------------------------------------------------------------------


def device_days(recs: list[dict[str, Any]]) -> dict[str, float]:
    """Per device, the days of the captures it is in (each capture's span, first packet to last flow end)."""
    spans: dict[str, list[int]] = defaultdict(lambda: [1 << 62, 0])
    present: dict[str, set[str]] = defaultdict(set)
    for r in recs:
        if r["event_type"] != "flow":
            continue
        span = spans[r["source"]]
        span[0], span[1] = min(span[0], r["first_seen_ms"]), max(span[1], r["last_seen_ms"])
        for d in (r.get("src_device"), r.get("dst_device")):
            if d:
                present[d].add(r["source"])
    return {d: sum((spans[s][1] - spans[s][0]) / 86_400_000 for s in sources) for d, sources in present.items()}


def false_alerts(recs: list[dict[str, Any]]) -> dict[str, Any]:
    days = device_days(recs)
    alerts = Counter(a["host_mac"] for a in recs if a["event_type"] == "alert" and a["kind"] == "anomaly")
    total = sum(days.values())
    return {"device_days": round(total, 2), "anomaly_alerts": sum(alerts.values()),
            "per_device_day": round(sum(alerts.values()) / total, 3) if total else None,
            "devices": {d: {"days": round(v, 2), "alerts": alerts.get(d, 0)} for d, v in sorted(days.items())},
            "examples": [a["message"][:200] for a in recs if a["event_type"] == "alert" and a["kind"] == "anomaly"][:5],
            "new_device_alerts": sum(a["kind"] == "new_device" for a in recs if a["event_type"] == "alert")}


def oconnor(folder: Path, kind: str, tmp: Path, split_ms: int) -> dict[str, Any]:
    captures = sorted(folder.glob("*.pcap"))
    heads = [editcap(c, tmp / f"oc-head-{c.name}", before_ms=split_ms) for c in captures]
    tails = [editcap(c, tmp / f"oc-tail-{c.name}", after_ms=split_ms) for c in captures]
    baseline = tmp / f"oconnor-{kind}.json"
    learn(heads, baseline, kind)
    return {"learnt_until": split_ms, "baseline_bytes": baseline.stat().st_size,
            **false_alerts(score(tails, baseline))}


def mudscope(folder: Path, kind: str, tmp: Path) -> dict[str, Any]:
    windows = sorted(folder.glob("*.pcap"))
    before, scans, after = windows[0], windows[1:-1], windows[-1]
    baseline = tmp / f"mudscope-{kind}.json"
    learn([before], baseline, kind)
    benign = false_alerts(score([after], baseline))
    scanned = score(scans, baseline)
    plug_alerts = [a for a in scanned if a["event_type"] == "alert" and a["kind"] == "anomaly"]
    return {"benign_after": benign, "scan_windows": {"anomaly_alerts": len(plug_alerts),
                                                      "examples": [a["message"][:200] for a in plug_alerts[:3]]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lab", type=Path, help="folder of lab runs (one per seed)")
    parser.add_argument("--oconnor", type=Path, default=REPO.parent / "shared" / "datasets" / "oconnor-lab")
    parser.add_argument("--oconnor-split", default="2021-03-11T15:00:00Z", help="learn before, score after")
    parser.add_argument("--mudscope", type=Path,
                        default=REPO.parent / "shared" / "datasets" / "mudscope" / "tue-tplink")
    parser.add_argument("--kinds", nargs="+", default=["gauss", "iforest"])
    parser.add_argument("--skip-lab", action="store_true")
    args = parser.parse_args()
    split_ms = int(time.mktime(time.strptime(args.oconnor_split, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone) * 1000
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for kind in args.kinds:
            print(f"== {kind}", flush=True)
            part: dict[str, Any] = {}
            if args.oconnor.exists():
                part["oconnor"] = oconnor(args.oconnor, kind, tmp, split_ms)
                figures = {k: part["oconnor"][k] for k in ("device_days", "anomaly_alerts", "per_device_day")}
                print(f"  O'Connor: {json.dumps(figures)}", flush=True)
            if args.mudscope.exists():
                part["mudscope"] = mudscope(args.mudscope, kind, tmp)
                print(f"  MUDscope: {json.dumps(part['mudscope'])[:400]}", flush=True)
            if args.lab and not args.skip_lab:
                runs = sorted(p for p in args.lab.iterdir() if (p / "pcaps" / "infection-mirai.pcap").exists()
                              and (p / "phases" / "infection-mirai.csv").exists())
                part["lab"] = lab(runs, kind, tmp)
                print(f"  lab: {json.dumps(part['lab']['summary'])}", flush=True)
            results[kind] = part
    (OUT / "baseline-eval.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {OUT / 'baseline-eval.json'}")


if __name__ == "__main__":
    main()
