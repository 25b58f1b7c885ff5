"""`iotscan inspect` vs `tshark -r big.pcap -Y <the same filter>`, side by side on a ~1M-packet capture.

    python benchmarks/bench_inspect.py [--runs 3] [--copies 13]

The capture is the nDPI corpus of bench_analyze (corpus.py, cached in benchmarks/out). Three TCP
flows are inspected, one early in the capture, one in the middle and one in its last copy (the worst
case: both of inspect's passes read to the end). For each, alternately:

* tshark alone: ``tshark -n -r CAPTURE -Y FILTER`` (its one-line summaries to /dev/null), FILTER
  being the display filter inspect builds for the flow;
* ``iotscan inspect CAPTURE FLOW_ID`` (the flow pass meters the whole capture until the flow);
* ``iotscan inspect CAPTURE FLOW_ID --5tuple T`` (the command `analyze --explain` prints: the flow
  pass meters only that 5-tuple's packets, through a BPF filter).

Both iotscan variants write NDJSON to /dev/null. Reported: median wall seconds and median CPU
seconds (user + system of the whole process tree: this machine is shared, and CPU time is the less
noisy of the two), and each variant's ratio to tshark alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, packets_in
from corpus import OUT, REPO, build

sys.path.insert(0, str(REPO))
from iotscan.capture.source import FlowSource, MeterConfig
from iotscan.inspect import FlowSelector, find_flows, flows_filter, record_five_tuple
from iotscan.output.records import flow_record

PY = sys.executable
MIN_PACKETS = 20  # a flow worth looking at


def pick_flows(capture: Path) -> dict[str, dict]:
    """One pass over the capture; TCP flows of >= MIN_PACKETS packets nearest 5%, 50% and 97% of its time span."""
    cache = OUT / f"inspect-flows-{capture.stem}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    candidates = []
    first = last = None
    for flow in FlowSource(MeterConfig(source=str(capture), statistics=False)):
        record = flow_record(flow, str(capture), capture.name)
        first = record["first_seen_ms"] if first is None else min(first, record["first_seen_ms"])
        last = record["last_seen_ms"] if last is None else max(last, record["last_seen_ms"])
        if record["protocol"] == 6 and record["packets"] >= MIN_PACKETS:
            candidates.append(record)
    assert first is not None and last is not None and candidates
    picked = {}
    for name, at in (("early", 0.05), ("middle", 0.50), ("late", 0.97)):
        target = first + at * (last - first)
        picked[name] = min(candidates, key=lambda r, t=target: abs(r["first_seen_ms"] - t))
    cache.write_text(json.dumps(picked, indent=2) + "\n")
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--copies", type=int, default=13, help="copies of the nDPI corpus (13: about 1M packets)")
    args = parser.parse_args()

    capture = build(args.copies)
    packets = packets_in(capture)
    print(f"capture {capture.name}: {packets:,} packets; {args.runs} alternated runs per variant", flush=True)
    flows = pick_flows(capture)
    results = {"capture": capture.name, "packets": packets, "runs": args.runs, "flows": {}}
    for position, record in flows.items():
        lookup = find_flows(str(capture), FlowSelector(flow_id=record["flow_id"]),
                            MeterConfig(source=str(capture), statistics=False))
        assert [f.record["flow_id"] for f in lookup.flows] == [record["flow_id"]]
        # tshark alone gets the flow's filter, without the marker clause that lets inspect stop early.
        flow_only = flows_filter(lookup.flows, marker=False)
        inspect = [PY, "-m", "iotscan", "inspect", str(capture), str(record["flow_id"]), "-f", "ndjson",
                   "-o", "/dev/null", "--quiet"]
        variants = {
            "tshark alone": ["tshark", "-n", "-r", str(capture), "-Y", flow_only],
            "inspect FLOW_ID": inspect,
            "inspect FLOW_ID --5tuple": [*inspect, "--5tuple", record_five_tuple(record)],
        }
        names = list(variants)
        print(f"\n{position}: flow {record['flow_id']} {record_five_tuple(record)} {record['app']}, "
              f"{record['packets']} packets", flush=True)
        runs = alternate(variants, args.runs)
        wall = {n: [r.wall_s for r in runs[n]] for n in names}
        cpu = {n: [r.cpu_s for r in runs[n]] for n in names}
        base_w, base_c = statistics.median(wall["tshark alone"]), statistics.median(cpu["tshark alone"])
        entry = {"flow_id": record["flow_id"], "five_tuple": record_five_tuple(record), "packets": record["packets"],
                 "variants": {}}
        print(f"  {'variant':26s} {'median wall':>12s} {'vs tshark':>10s} {'median cpu':>11s} {'vs tshark':>10s}")
        for name in names:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            entry["variants"][name] = {"median_wall_s": round(w, 3), "wall_vs_tshark": round(w / base_w, 3),
                                       "median_cpu_s": round(c, 3), "cpu_vs_tshark": round(c / base_c, 3),
                                       "wall_s": [round(x, 3) for x in wall[name]],
                                       "cpu_s": [round(x, 3) for x in cpu[name]]}
            print(f"  {name:26s} {w:10.2f} s {w / base_w:9.2f}x {c:9.2f} s {c / base_c:9.2f}x")
        results["flows"][position] = entry
    OUT.mkdir(exist_ok=True)
    (OUT / "results-inspect.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {OUT / 'results-inspect.json'}")


if __name__ == "__main__":
    main()
