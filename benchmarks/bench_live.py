"""iotscan live vs a bare NFStreamer on an interface: the highest replay rate each keeps up with.

    sudo python benchmarks/bench_live.py [--rates 5000,10000,...] [--seconds 4] [--mbps]
    sudo python benchmarks/bench_live.py --flood [--rates 20000,40000,80000] [--seconds 60] [--beside-pps 1000]

Creates two network namespaces joined by a veth pair (no link to the host namespace, no address,
no route out, IPv6 off so the kernel sends nothing of its own), replays a capture with tcpreplay
inside one namespace onto its veth end at increasing rates (bounded: --limit packets per trial),
and captures on the peer end inside the other namespace, with `iotscan live` and, alternately at
each rate, with a bare NFStreamer loop (one meter, the same statistics). Namespaces are deleted
at the end, whatever happens.

Per trial: sent = packets tcpreplay sent (plus a few tick packets after the replay that let both
tools publish their final counts); received = packets the tool metered; kernel drops = what
libpcap reports (ps_drop: the ring buffer was full). lost = max(sent - received, kernel drops):
a dropped packet is also a missing one, so the two are not added. A rate is sustained when
lost / sent < 0.1 %. `link drops` (sent - veth rx) are packets the kernel's own backlog dropped
before any capture could see them: they count against both tools alike; they show when the
machine, not the tool, is the limit. This machine's 2 cores are shared: expect noise.

--flood replays the spoofed SYN flood of flood.py (a million one-packet flows, looped as the trial needs) instead,
for --seconds (default 60), with the ordinary capture replayed beside it at --beside-pps (a second tcpreplay on
the same link). For iotscan it also reports the ordinary flows written live and how many carry a verdict, against
a reference trial of the ordinary replay alone, and the flood records and folded flows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
PY = sys.executable
LOSS_LIMIT = 0.001  # 0.1 %
TICKS, TICK_GAP_S = 3, 1.2  # after the replay: NFStream publishes its counters once per second of packet time
DEFAULT_RATES = (5_000, 10_000, 20_000, 40_000, 80_000, 160_000)
FLOOD_RATES = (20_000, 40_000, 80_000)


# -- namespaces ----------------------------------------------------------------------------------


class Lab:
    """Two namespaces and a veth pair between them, created directly inside them."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.tx_ns, self.rx_ns = f"iotscan-bench-tx-{tag}", f"iotscan-bench-rx-{tag}"
        self.tx_if, self.rx_if = f"vtx{tag}", f"vrx{tag}"

    def __enter__(self) -> Lab:
        try:
            for ns in (self.tx_ns, self.rx_ns):
                _run("ip", "netns", "add", ns)
                self.ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1")
            # Created inside the sending namespace with its peer in the receiving one: never in the host's.
            self.ns(self.tx_ns, "ip", "link", "add", self.tx_if, "mtu", "65535", "type", "veth",
                    "peer", "name", self.rx_if, "mtu", "65535", "netns", self.rx_ns)
            for ns, ifname in ((self.tx_ns, self.tx_if), (self.rx_ns, self.rx_if)):
                if shutil.which("ethtool"):  # no GRO: every frame reaches the capture as sent
                    subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-K", ifname, "gro", "off"],
                                   capture_output=True, check=False)
                self.ns(ns, "ip", "link", "set", ifname, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.tx_ns, self.rx_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def ns(self, ns: str, *cmd: str) -> str:
        return _run("ip", "netns", "exec", ns, *cmd)

    def capturing(self) -> bool:
        """True once a packet socket is bound and running on the receiving end (/proc/net/packet)."""
        ifindex = self.ns(self.rx_ns, "cat", f"/sys/class/net/{self.rx_if}/ifindex").strip()
        for line in self.ns(self.rx_ns, "cat", "/proc/net/packet").splitlines()[1:]:
            fields = line.split()  # sk RefCnt Type Proto Iface R Rmem User Inode
            if len(fields) >= 6 and fields[4] == ifindex and fields[5] == "1":
                return True
        return False

    def rx_packets(self) -> int:
        return int(self.ns(self.rx_ns, "cat", f"/sys/class/net/{self.rx_if}/statistics/rx_packets"))

    def replay(self, capture: Path, pps: int | None, mbps: float | None, limit: int) -> tuple[int, float]:
        """Replay `limit` packets of `capture` (and BESIDE's capture at its rate for as long, at the same time);
        return (packets sent, achieved packets/s of `capture`)."""
        beside = None
        if BESIDE and pps:
            other, other_pps = BESIDE[0]
            beside = subprocess.Popen(["ip", "netns", "exec", self.tx_ns, *_tcpreplay(
                self.tx_if, other, [f"--pps={other_pps}"], max(1, int(other_pps * limit / pps)))],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rate = [f"--mbps={mbps}"] if mbps else [f"--pps={pps}"]
        out = self.ns(self.tx_ns, *_tcpreplay(self.tx_if, capture, rate, limit))
        sent = int(re.search(r"Successful packets:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
        rated = re.search(r"Rated:.*?,\s*([\d.]+) pps", out)
        if beside is not None:
            other_out, _ = beside.communicate(timeout=600)
            sent += int(re.search(r"Successful packets:\s+(\d+)", other_out).group(1))  # type: ignore[union-attr]
        return sent, float(rated.group(1)) if rated else 0.0

    def ticks(self, tick: Path) -> int:
        sent = 0
        for _ in range(TICKS):
            time.sleep(TICK_GAP_S)
            out = self.ns(self.tx_ns, "tcpreplay", f"--intf1={self.tx_if}", str(tick))
            sent += int(re.search(r"Successful packets:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
        return sent


def _tcpreplay(interface: str, capture: Path, rate: list[str], limit: int) -> list[str]:
    loops = max(1, -(-limit // max(1, _packets_in(capture))))
    return ["tcpreplay", f"--intf1={interface}", *rate, f"--loop={loops}", f"--limit={limit}", str(capture)]


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout + proc.stderr


_PACKET_COUNTS: dict[Path, int] = {}


def _packets_in(capture: Path) -> int:
    if capture not in _PACKET_COUNTS:
        out = _run("capinfos", "-T", "-r", "-c", str(capture))
        _PACKET_COUNTS[capture] = int(out.split("\t")[1])
    return _PACKET_COUNTS[capture]


def _tick_capture(path: Path) -> Path:
    """One UDP packet between TEST-NET-1 addresses: it only ever crosses the namespaces' veth."""
    payload = b"iotscan-bench-tick"
    udp = struct.pack("!HHHH", 9, 9, 8 + len(payload), 0) + payload
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                               bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])))
    checksum = sum(struct.unpack("!10H", bytes(ip)))
    checksum = (checksum & 0xFFFF) + (checksum >> 16)
    struct.pack_into("!H", ip, 10, ~checksum & 0xFFFF)
    frame = bytes.fromhex("020000000002" "020000000001" "0800") + bytes(ip) + udp
    now = time.time()
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    record = struct.pack("<IIII", int(now), int(now % 1 * 1e6), len(frame), len(frame))
    path.write_bytes(header + record + frame)
    return path


# -- the tools under test ------------------------------------------------------------------------


def _wait_until_capturing(lab: Lab, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {proc.stderr.read().decode()[-800:]}")
        if lab.capturing():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start capturing within {timeout:g} s")


IOTSCAN_ARGS: list[str] = []  # --iotscan-args, e.g. --no-devices
BESIDE: list[tuple[Path, int]] = []  # --flood: the ordinary capture replayed beside it, and its rate
FLOOD_SOURCES = "11."  # flood.py's spoofed sources: 11.0.0.0/8
STOP_TIMEOUT_S = [120.0]  # how long a capture may take to stop after SIGINT (--flood: 600 s), else it is killed


def run_iotscan(lab: Lab, capture: Path, tick: Path, pps: int | None, mbps: float | None, limit: int,
                tmp: Path) -> dict:
    out = tmp / "iotscan.ndjson"
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(["ip", "netns", "exec", lab.rx_ns, PY, "-m", "iotscan", "live", lab.rx_if,
                             "--format", "ndjson", "-o", str(out), "--quiet", *IOTSCAN_ARGS],
                            cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        _wait_until_capturing(lab, proc, "iotscan live")
        return _trial(lab, capture, tick, pps, mbps, limit, proc, lambda: _iotscan_counts(out))
    finally:
        _stop(proc)


def _iotscan_counts(out: Path) -> tuple[int, int, dict]:
    """Packets metered and dropped by the kernel, and what was written: flood records, folded flows, packets left
    unread in the kernel's buffer at the stop (counted as lost: sent, not metered), the ordinary
    flows (neither the flood's nor the tick's) and how many carry a verdict, the warnings' codes."""
    records = [json.loads(line) for line in out.read_bytes().splitlines()]
    summary = records[-1]
    assert summary["event_type"] == "summary", summary
    ordinary = [r for r in records if r["event_type"] == "flow" and not r["src_ip"].startswith(FLOOD_SOURCES)
                and not r["src_ip"].startswith("192.0.2.")]
    return summary["packets"], summary["dropped_packets"], {
        "floods": summary.get("floods", 0), "folded_flows": summary.get("folded_flows", 0),
        "flows_counted": summary["flows"], "unread_packets": summary.get("unread_packets", 0),
        "ordinary_flows": len(ordinary),
        "ordinary_with_verdict": sum("verdict" in r for r in ordinary),
        "flood_targets": Counter(f"{r['dst_ip']}:{r['dst_port']}/{r['protocol']}" for r in records
                                 if r["event_type"] == "flood").most_common(5),
        "warnings": sorted({w["code"] for w in summary["warnings"]})}


def run_bare(lab: Lab, capture: Path, tick: Path, pps: int | None, mbps: float | None, limit: int,
             tmp: Path) -> dict:
    out = tmp / "bare.jsonl"
    with out.open("wb") as sink:
        proc = subprocess.Popen(["ip", "netns", "exec", lab.rx_ns, PY, "-u", __file__, "--bare", lab.rx_if],
                                stdout=sink, stderr=subprocess.PIPE)
    try:
        _wait_until_capturing(lab, proc, "the bare NFStreamer")
        return _trial(lab, capture, tick, pps, mbps, limit, proc, lambda: _bare_counts(out))
    finally:
        _stop(proc)


def _bare_counts(out: Path) -> tuple[int, int, dict]:
    reports = [json.loads(line) for line in out.read_bytes().splitlines() if line.startswith(b"{")]
    last = reports[-1]
    return last["packets_processed"] + last["packets_ignored"], last["packets_dropped_filtered_by_kernel"], {}


def _trial(lab: Lab, capture: Path, tick: Path, pps: int | None, mbps: float | None, limit: int,
           proc: subprocess.Popen, counts) -> dict:
    rx_before = lab.rx_packets()
    sent, achieved = lab.replay(capture, pps, mbps, limit)
    sent += lab.ticks(tick)
    delivered = lab.rx_packets() - rx_before
    time.sleep(2.5)  # a libpcap block (up to 1 s) and one more of NFStream's reports (every 1 s)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S[0])
    except subprocess.TimeoutExpired:  # a flow table of a million flows takes a bare NFStreamer long to flush
        proc.kill()
        proc.wait()
        try:
            received, kernel_drops, written = counts()  # the bare loop's last report, written every second
        except (IndexError, ValueError, AssertionError):
            return {"sent": sent, "achieved_pps": round(achieved), "delivered": delivered, "received": 0,
                    "kernel_drops": 0, "link_drops": max(sent - delivered, 0), "lost": sent, "loss": 1.0,
                    "stopped": False}
        written["stopped"] = False
    else:
        received, kernel_drops, written = counts()
    lost = max(sent - received, kernel_drops, 0)
    return {"sent": sent, "achieved_pps": round(achieved), "delivered": delivered, "received": received,
            "kernel_drops": kernel_drops, "link_drops": max(sent - delivered, 0), "lost": lost,
            "loss": lost / sent if sent else 1.0, **written}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def bare_main(interface: str) -> None:
    """A bare NFStreamer on an interface, as a user of NFStream writes it (one meter, like iotscan)."""
    from nfstream import NFStreamer

    streamer = NFStreamer(source=interface, statistical_analysis=True, n_meters=1, performance_report=1)
    flows = 0
    with contextlib.suppress(KeyboardInterrupt):
        for _ in streamer:
            flows += 1
    print(f"flows {flows}", flush=True)


# -- main ----------------------------------------------------------------------------------------


def replay_capture() -> Path:
    """The nDPI corpus unit (78k packets of hundreds of protocols) if ../shared is here, else the samples,
    without IP fragments.

    NFStream's engine opens live captures with PACKET_FANOUT and its DEFRAG flag, so the kernel
    reassembles IPv4 fragments (and holds back incomplete trains) before either tool sees them:
    with fragments in the replay, sent and received could not be compared packet for packet.
    """
    sys.path.insert(0, str(REPO / "benchmarks"))
    from corpus import NDPI, build

    OUT.mkdir(exist_ok=True)
    if NDPI.is_dir():
        source = build(1)
    else:
        source = OUT / "samples-merged.pcap"
        if not source.exists():
            samples = sorted(str(p) for p in (REPO / "samples").glob("*.pcap"))
            _run("mergecap", "-a", "-F", "pcap", "-w", str(source), *samples)
    target = source.with_name(source.stem + "-nofrag.pcap")
    if not target.exists():
        _run("tshark", "-r", str(source), "-Y", "not (ip.flags.mf == 1 or ip.frag_offset > 0)", "-F", "pcap",
             "-w", str(target))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)),
                        help="packets/s (or Mbit/s with --mbps), comma-separated, increasing")
    parser.add_argument("--mbps", action="store_true", help="rates are Mbit/s (tcpreplay --mbps)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="replay length per trial at the nominal rate (default 4, with --flood 60)")
    parser.add_argument("--max-packets", type=int, default=None,
                        help="cap on packets per trial (default 600,000, with --flood 6,000,000)")
    parser.add_argument("--flood", action="store_true",
                        help="replay flood.py's spoofed SYN flood, with the ordinary capture beside it")
    parser.add_argument("--beside-pps", type=int, default=1000, help="--flood: the ordinary capture's rate")
    parser.add_argument("--iotscan-args", default="",
                        help="extra options for iotscan live, e.g. '--no-devices' (default: full pipeline)")
    parser.add_argument("--bare", metavar="IFACE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_main(args.bare)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench_live.py needs root (network namespaces, capture): run it with sudo")
    # SIGTERM ends the benchmark as Ctrl-C does, through the namespaces' deletion (a background job ignores SIGINT)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in ("ip", "tcpreplay", "capinfos", "mergecap", "tshark"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: ./install.sh installs it")

    IOTSCAN_ARGS[:] = args.iotscan_args.split()
    capture = replay_capture()
    seconds = args.seconds or (60.0 if args.flood else 4.0)
    max_packets = args.max_packets or (6_000_000 if args.flood else 600_000)
    if args.flood:
        if args.rates == ",".join(map(str, DEFAULT_RATES)):
            args.rates = ",".join(map(str, FLOOD_RATES))
        from flood import build as build_flood  # replay_capture put benchmarks/ on the path

        BESIDE[:] = [(capture, args.beside_pps)]
        STOP_TIMEOUT_S[0] = 600.0
        capture = build_flood()
    rates = [float(r) for r in args.rates.split(",")]
    unit = "Mbit/s" if args.mbps else "packets/s"
    results: dict = {"capture": capture.name, "capture_packets": _packets_in(capture), "unit": unit,
                     "loss_limit": LOSS_LIMIT, "iotscan_args": IOTSCAN_ARGS, "trials": []}
    best = {"iotscan live": None, "bare NFStreamer": None}
    failed_in_a_row = {name: 0 for name in best}
    print(f"iotscan live {' '.join(IOTSCAN_ARGS) or '(full pipeline)'} vs a bare NFStreamer (1 meter)")
    results["beside"] = [{"capture": c.name, "pps": p} for c, p in BESIDE]
    print(f"replaying {capture.name} ({results['capture_packets']:,} packets), ~{seconds:g} s per trial"
          + "".join(f", with {c.name} at {p:,} packets/s beside it" for c, p in BESIDE))
    print(f"{'tool':16s} {'rate':>9s} {'achieved':>9s} {'sent':>9s} {'received':>9s} {'k.drops':>8s} "
          f"{'link drops':>10s} {'loss':>8s}")
    with tempfile.TemporaryDirectory() as tmpdir, Lab() as lab:
        tmp = Path(tmpdir)
        tick = _tick_capture(tmp / "tick.pcap")
        if BESIDE:  # the ordinary replay alone, for the flows it gives iotscan without a flood
            (other, other_pps), = beside = BESIDE[:]
            BESIDE.clear()
            alone = run_iotscan(lab, other, tick, other_pps, None, int(other_pps * seconds), tmp)
            BESIDE[:] = beside
            results["ordinary_alone"] = alone
            print(f"{'ordinary alone':16s} {other_pps:9,} {alone['achieved_pps']:9,} {alone['sent']:9,} "
                  f"{alone['received']:9,} {alone['kernel_drops']:8,} {alone['link_drops']:10,} {alone['loss']:8.3%}"
                  f"  {alone['ordinary_flows']:,} flows, {alone['ordinary_with_verdict']:,} with a verdict",
                  flush=True)
        for i, rate in enumerate(rates):
            if all(n >= 2 for n in failed_in_a_row.values()):
                break  # both failed twice in a row: higher rates will not do better
            pps = None if args.mbps else int(rate)
            mbps = rate if args.mbps else None
            est_pps = pps or rate * 1e6 / 8 / 320
            limit = int(min(max_packets, max(1000, est_pps * seconds)))
            order = list(best) if i % 2 == 0 else list(reversed(best))  # alternate who goes first
            for name in order:
                if failed_in_a_row[name] >= 2:
                    continue
                runner = run_iotscan if name == "iotscan live" else run_bare
                trial = runner(lab, capture, tick, pps, mbps, limit, tmp)
                trial.update(tool=name, rate=rate)
                results["trials"].append(trial)
                ok = trial["loss"] < LOSS_LIMIT
                if ok:
                    best[name] = rate if best[name] is None else max(best[name], rate)
                failed_in_a_row[name] = 0 if ok else failed_in_a_row[name] + 1
                written = ""
                if "ordinary_flows" in trial:
                    written = (f"  {trial['floods']:,} floods of {trial['folded_flows']:,} flows; "
                               f"{trial['ordinary_flows']:,} ordinary flows, {trial['ordinary_with_verdict']:,} "
                               f"with a verdict; {' '.join(trial['warnings'])}")
                print(f"{name:16s} {rate:9,.0f} {trial['achieved_pps']:9,} {trial['sent']:9,} "
                      f"{trial['received']:9,} {trial['kernel_drops']:8,} {trial['link_drops']:10,} "
                      f"{trial['loss']:8.3%}{'' if ok else '  > 0.1%'}{written}", flush=True)
    results["highest_sustained"] = best
    print("\nhighest rate sustained with < 0.1% loss:")
    for name, rate in best.items():
        print(f"  {name:16s} {'none of the rates tried' if rate is None else f'{rate:,.0f} {unit}'}")
    OUT.mkdir(exist_ok=True)
    name = "results-live-flood.json" if args.flood else "results-live.json"
    (OUT / name).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {OUT / name}")


if __name__ == "__main__":
    main()
