"""iotscan's flow risks against an oracle nobody here wrote: nDPI's own expected outputs.

nDPI's regression corpus (../shared/pcaps/ndpi) comes with the output ndpiReader gave for every capture
(expected/NAME.out), which lists, per flow, the risks nDPI found ("[Risk: ** Clear-Text Credentials **]").
This runs `iotscan analyze` over the whole corpus once (risks on, devices and scoring off), and for every
risk of iotscan's catalogue that names nDPI risks (iotscan/data/risks.json, "ndpi"), counts per capture and
flow (protocol and the two endpoints, either direction; flows that iotscan or ndpiReader cut in several
records are one) whether each side named it: precision and recall of iotscan against nDPI, for the risk as
iotscan reports it and for the part that nDPI's detection gave ("detector": "nDPI"; the rest is iotscan's own
rules: MQTT credentials, the outdated-software table).

    .venv/bin/python benchmarks/risks_vs_ndpi.py                 # the table (markdown), also in benchmarks/out/
    .venv/bin/python benchmarks/risks_vs_ndpi.py --examples 5    # and up to 5 disagreements per risk, to check

The nDPI that made expected/ is not the one inside NFStream 6.6 (5.0.0): the files name risks that 5.0 no
longer has ("TLS Susp ESNI Usage", "Fully Encrypted Flow") and spell one differently ("Malicious Fingerpint");
where the two nDPIs disagree, so does iotscan, which reads 5.0's detection.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "pcaps" / "ndpi"
OUT = REPO / "benchmarks" / "out"
_FLOW_LINE = re.compile(r"^\t\d+\t(\S+) (\S+) (?:<->|->) (\S+) \[")
_RISKS = re.compile(r"\[Risk: ([^\]]*)\]")
_PROTOCOLS = {"TCP": 6, "UDP": 17, "ICMP": 1, "ICMPV6": 58, "IGMP": 2, "SCTP": 132}
TARGET = 0.95

Key = tuple[int, tuple[str, int], tuple[str, int]]


def endpoint(text: str) -> tuple[str, int]:
    ip, _, port = text.rpartition(":")
    if not ip:  # no port (ndpiReader prints some protocols without)
        return text.strip("[]"), 0
    return ip.strip("[]"), int(port) if port.isdigit() else 0


def flow_key(protocol: int, a: tuple[str, int], b: tuple[str, int]) -> Key:
    first, second = sorted([a, b])
    return protocol, first, second


def oracle(path: Path) -> dict[Key, set[str]]:
    """nDPI's risk names per flow of one expected output."""
    flows: dict[Key, set[str]] = collections.defaultdict(set)
    for line in path.read_text(errors="replace").splitlines():
        match = _FLOW_LINE.match(line)
        if match is None or match.group(1) not in _PROTOCOLS:
            continue
        key = flow_key(_PROTOCOLS[match.group(1)], endpoint(match.group(2)), endpoint(match.group(3)))
        risks = _RISKS.search(line)
        flows[key] |= {r.strip() for r in risks.group(1).split("**") if r.strip()} if risks else set()
    return flows


def ndpi_words() -> dict[str, str]:
    """nDPI's risk enum names -> the words ndpiReader prints (ndpi_risk2str of the nDPI in NFStream's engine)."""
    import _lib_engine  # NFStream's compiled engine: nDPI is linked into it
    from nfstream.engine import create_engine

    ffi, _ = create_engine()
    to_str = ctypes.CDLL(_lib_engine.__file__).ndpi_risk2str
    to_str.restype, to_str.argtypes = ctypes.c_char_p, [ctypes.c_int]
    return {name: to_str(value).decode() for value, name in ffi.typeof("ndpi_risk_enum").elements.items()}


def iotscan_flows(corpus: Path) -> dict[str, dict[Key, set[tuple[str, str]]]]:
    """iotscan's (risk id, detector) per capture (file name) and flow."""
    proc = subprocess.run([sys.executable, "-m", "iotscan", "analyze", str(corpus), "-f", "ndjson", "--no-score",
                           "--no-devices", "-q"], cwd=REPO, capture_output=True, check=False)
    if proc.returncode not in (0, 2):  # 2: a few corpus files are not captures iotscan reads
        raise SystemExit(f"iotscan analyze failed ({proc.returncode}): {proc.stderr.decode()[-800:]}")
    out: dict[str, dict[Key, set[tuple[str, str]]]] = collections.defaultdict(lambda: collections.defaultdict(set))
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if record.get("event_type") != "flow":
            continue
        key = flow_key(record["protocol"], (record["src_ip"], record["src_port"]),
                       (record["dst_ip"], record["dst_port"]))
        out[Path(record["source"]).name][key] |= {(r["risk"], r["detector"]) for r in record.get("risks") or ()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--examples", type=int, default=0, help="disagreements listed per risk")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from iotscan.detect.risk_catalogue import load_catalogue

    words = ndpi_words()
    kinds = {risk.id: {words[name] for name, *_ in risk.ndpi if name in words}
             for risk in load_catalogue().risks.values() if risk.ndpi}
    ours = iotscan_flows(args.corpus)
    counts = {(kind, part): collections.Counter() for kind in kinds for part in ("all", "nDPI")}
    examples: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    captures = 0
    for expected in sorted((args.corpus / "expected").glob("*.out")):
        name = expected.name.removesuffix(".out")
        if not (args.corpus / name).exists():
            continue
        captures += 1
        theirs, mine = oracle(expected), ours.get(name, {})
        for key in set(theirs) | set(mine):
            for kind, names in kinds.items():
                said_ndpi = bool(theirs.get(key, set()) & names)
                ours_here = {detector for risk, detector in mine.get(key, set()) if risk == kind}
                for part, said_us in (("all", bool(ours_here)), ("nDPI", "nDPI" in ours_here)):
                    outcome = "tp" if said_ndpi and said_us else "fp" if said_us else "fn" if said_ndpi else None
                    if outcome:
                        counts[(kind, part)][outcome] += 1
                outcome = "fp" if ours_here and not said_ndpi else "fn" if said_ndpi and not ours_here else None
                if outcome and len(examples[(kind, outcome)]) < args.examples:
                        examples[(kind, outcome)].append(f"{name} {key}{'' if key in mine else ' (no iotscan flow)'}"
                                                         f"{'' if key in theirs else ' (no nDPI flow)'}")
    lines = [f"iotscan's flow risks against nDPI's expected outputs: {captures} captures of {args.corpus}",
             "", "| risk (iotscan) | nDPI risk | nDPI flows | iotscan flows | both | precision | recall | "
             f">= {TARGET} | nDPI-detected part: precision | recall |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for kind, names in kinds.items():
        figures = []
        for part in ("all", "nDPI"):
            c = counts[(kind, part)]
            tp, fp, fn = c["tp"], c["fp"], c["fn"]
            figures.append((tp, fp, fn, tp / (tp + fp) if tp + fp else None, tp / (tp + fn) if tp + fn else None))
        (tp, fp, fn, precision, recall), (*_, nd_precision, nd_recall) = figures
        shown = [f"{v:.3f}" if v is not None else "-" for v in (precision, recall, nd_precision, nd_recall)]
        met = "no flows" if precision is None and recall is None else \
            "met" if (precision or 0) >= TARGET and (recall or 0) >= TARGET else "NOT met"
        lines.append(f"| {kind} | {', '.join(sorted(names))} | {tp + fn} | {tp + fp} | {tp} | {shown[0]} | "
                     f"{shown[1]} | {met} | {shown[2]} | {shown[3]} |")
    for (kind, outcome), found in sorted(examples.items()):
        lines += ["", f"{kind}, {'iotscan only' if outcome == 'fp' else 'nDPI only'}:", *(f"  {e}" for e in found)]
    report = "\n".join(lines)
    print(report)
    OUT.mkdir(exist_ok=True)
    (OUT / "risks_vs_ndpi.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
