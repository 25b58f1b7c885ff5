"""One lab run: build the namespaces, start the services, record each scenario, write the manifest.

Everything the run creates is torn down in ``finally``, on SIGINT and SIGTERM too (they become
KeyboardInterrupt in the main thread while children run in their own process groups), and a
run first removes what a crashed earlier run left behind. The manifest is rewritten after each
scenario, so an interrupted run still leaves a usable, truthful dataset of what it finished.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import select
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from iotscan import __version__
from iotscan.errors import CaptureError, InputError
from iotscan.lab import scenarios as catalogue
from iotscan.lab.netns import LAN_SEGMENTS, SWITCH, Lab, cleanup_stale, host_networks, plan_lab
from iotscan.lab.scenario import FlowRule, Scenario, ScenarioContext, matching_rule, write_phases, write_rules
from iotscan.lab.services import ServiceStarter
from iotscan.lab.tools import BASE_TOOLS, install_command, missing_tools, packages_for, tool_versions

MANIFEST_FIELDS = ("path", "label", "family", "label_source", "note")
MAX_PACKETS = 400_000  # per capture: a safety net far above what any default scenario sends
CAPTURE_FILTER = "not ip6 and not igmp"  # IPv6 is off in the lab; IGMP joins are link noise


@dataclass
class Options:
    out_dir: Path
    scenarios: Sequence[str] | None = None
    seed: int = 1
    duration_scale: float = 1.0
    force: bool = False
    count_flows: bool = True
    command_line: str = ""


@dataclass
class ScenarioResult:
    name: str
    label: str
    family: str
    segment: str
    pcap: str
    rules: str | None
    seconds: float
    packets: int | None
    dropped: int | None
    pcap_bytes: int
    notes: list[str]
    commands: list[str]
    involved: list[str] = field(default_factory=list)
    flows: dict[str, int] = field(default_factory=dict)  # "label/family" -> flows
    stray_flows: int = 0  # flows whose label the audit doubts (see audit_flows)
    stray_examples: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)  # attacks of its flow rules that no flow shows (silent_rules)
    phases: str | None = None  # phases/NAME.csv: labelled phases with their times


@dataclass
class RunReport:
    out_dir: Path
    results: list[ScenarioResult]
    seconds: float
    interrupted: bool
    total_bytes: int


def require_root() -> None:
    if os.geteuid() != 0:
        raise CaptureError("the attack lab must run as root: it creates network namespaces and captures in them "
                           "(try: sudo iotscan lab generate OUT_DIR)")


def needed_tools(chosen: Sequence[Scenario]) -> list[str]:
    return list(dict.fromkeys([*BASE_TOOLS, *(t for s in chosen for t in s.tools)]))


def check_tools(chosen: Sequence[Scenario]) -> None:
    missing = missing_tools(needed_tools(chosen))
    if missing:
        packages = packages_for(missing)
        raise CaptureError(f"lab tools missing: {', '.join(missing)} (Debian packages: {', '.join(packages)}); "
                           f"install them with: {install_command(packages)}")


def resolve_scenarios(names: Sequence[str] | None) -> list[Scenario]:
    try:
        return catalogue.select(names)
    except KeyError as exc:
        raise InputError(f"unknown scenario {exc.args[0]!r}; `iotscan lab list` shows the catalogue") from None


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise InputError(f"{out_dir} is not empty; choose another folder or pass --force to overwrite lab files in it")
    for sub in ("pcaps", "rules", "logs", "phases"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGINT) raise KeyboardInterrupt in the main thread, so `finally` tears down."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Teardown is not interrupted by a second Ctrl-C (it takes a second or two)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Capture:
    """tcpdump on one segment's bridge (a SPAN port of that LAN) into one pcap."""

    def __init__(self, lab: Lab, segment: str, path: Path) -> None:
        self.lab, self.path = lab, path
        argv = ["tcpdump", "-i", lab.bridge(segment), "-w", str(path), "-U", "-Z", "root", "-s", "0", "-n",
                "-c", str(MAX_PACKETS), CAPTURE_FILTER]
        self.proc = lab.spawn(SWITCH, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.stats = ""
        self._tail = b""
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        seen = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stderr.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
                if b"listening on" in seen:
                    self._tail = seen.split(b"listening on", 1)[1].partition(b"\n")[2]
                    return
        self.lab.stop(self.proc)
        raise CaptureError(f"tcpdump did not start: {seen.decode(errors='replace').strip()[:300]}")

    def stop(self) -> tuple[int | None, int | None]:
        """Stop tcpdump (it flushes on SIGINT); return (packets captured, packets dropped by the kernel)."""
        self.lab.stop(self.proc, sig=signal.SIGINT, grace=5.0)
        assert self.proc.stderr is not None
        try:
            self.stats = (self._tail + self.proc.stderr.read()).decode(errors="replace")
        finally:
            self.proc.stderr.close()
        return _stat(self.stats, "packets captured"), _stat(self.stats, "packets dropped by kernel")


def _stat(text: str, what: str) -> int | None:
    for line in text.splitlines():
        if line.strip().endswith(what):
            try:
                return int(line.split()[0])
            except ValueError:
                return None
    return None


def _write_manifest(out_dir: Path, results: Sequence[ScenarioResult], seed: int) -> None:
    tmp = out_dir / "MANIFEST.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in results:
            source = f"flow-rules:{r.rules}" if r.rules else "whole-capture"
            writer.writerow({"path": r.pcap, "label": r.label, "family": r.family, "label_source": source,
                             "note": f"iotscan lab, seed {seed}, {r.segment}: " + "; ".join(r.notes)})
    tmp.replace(out_dir / "MANIFEST.csv")


def read_rules(path: Path) -> list[FlowRule]:
    with open(path, newline="") as f:
        return [FlowRule(row["src_ip"], row["dst_ip"], int(row["protocol"]) if row["protocol"] else None,
                         int(row["dst_port"]) if row["dst_port"] else None, row["label"], row["family"])
                for row in csv.DictReader(f)]


def audit_flows(pcap: Path, rules: Sequence[FlowRule], default: tuple[str, str], involved: set[str],
                hostile: set[str]) -> tuple[dict[str, int], int, list[str], list[str]]:
    """Flows per "label/family" in one capture, as NFStream meters them; the flows whose label
    looks wrong: in a benign or mixed capture, a flow touching an attacker's address but labeled
    benign; in a pure attack capture, a flow touching none of the attack's addresses; and the
    attacks of the flow rules that no flow shows (silent_rules: a tool that did not run)."""
    from iotscan.capture.source import FlowSource, MeterConfig

    counts: Counter[str] = Counter()
    matched: Counter[int] = Counter()
    stray: list[str] = []
    stray_count = 0
    for flow in FlowSource(MeterConfig(source=str(pcap), n_dissections=0)):
        src, dst = flow.src_ip, flow.dst_ip
        rule = matching_rule(rules, src, dst, flow.protocol, flow.dst_port)
        if rule is not None:
            matched[rule] += 1
        label, family = (rules[rule].label, rules[rule].family) if rule is not None else default
        counts[f"{label}/{family}" if family else label] += 1
        if label == "benign":
            wrong = src in hostile or dst in hostile
        else:
            wrong = not rules and bool(involved) and src not in involved and dst not in involved
        if wrong:
            stray_count += 1
            if len(stray) < 5:
                stray.append(f"{src}:{flow.src_port} -> {dst}:{flow.dst_port}/{flow.protocol}")
    return dict(counts), stray_count, stray, silent_rules(rules, matched)


def silent_rules(rules: Sequence[FlowRule], matched: Counter[int]) -> list[str]:
    """The attack rules that matched no flow, in words. A reply rule (the victim's answers: the previous rule's
    hosts the other way round, any protocol and port; see ScenarioContext.attack_rules) may match none."""
    silent = []
    for i, rule in enumerate(rules):
        previous = rules[i - 1] if i else None
        reply = previous is not None and rule.protocol is None and rule.dst_port is None and \
            (rule.src_ip, rule.dst_ip, rule.family) == (previous.dst_ip, previous.src_ip, previous.family)
        if rule.label == "attack" and not reply and not matched[i]:
            port = f":{rule.dst_port}" if rule.dst_port is not None else ""
            silent.append(f"{rule.family or 'attack'} {rule.src_ip or 'any'} -> {rule.dst_ip or 'any'}{port}")
    return silent


def generate(options: Options, progress: Callable[[str], None] = lambda _: None) -> RunReport:
    """Run the lab; see the module docstring. Raises IotscanError subclasses, or KeyboardInterrupt."""
    chosen = resolve_scenarios(options.scenarios)
    if options.duration_scale <= 0 or options.duration_scale > 20:
        raise InputError("--duration-scale must be above 0 and at most 20")
    require_root()
    check_tools(chosen)
    out_dir = options.out_dir
    _prepare_out_dir(out_dir, options.force)
    removed = cleanup_stale()
    if removed:
        progress(f"removed {len(removed)} namespaces left by an earlier lab run")

    started = time.monotonic()
    results: list[ScenarioResult] = []
    interrupted = False
    plan = plan_lab(options.seed, host_networks())
    lab: Lab | None = None
    try:
        with _signals_interrupt():
            lab = Lab(plan)
            lab.create()
            lab.check_isolation()
            services = ServiceStarter(lab, options.seed).start()
            progress(f"lab up: {len(lab.namespaces)} namespaces, LANs {plan.networks['lan1']} and "
                     f"{plan.networks['lan2']}, WAN {plan.networks['wan']}")
            for index, sc in enumerate(chosen, 1):
                lab.check_isolation()
                progress(f"[{index}/{len(chosen)}] {sc.name}")
                results.append(_run_scenario(lab, services, sc, options))
                _write_manifest(out_dir, results, options.seed)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if lab is not None:
            with _signals_ignored():
                lab.destroy()
    if options.count_flows and not interrupted:
        hostile = {str(h.ip) for h in plan.hosts.values() if h.kind in ("bot", "atk1", "atk2", "cnc")}
        for r in results:
            rules = read_rules(out_dir / r.rules) if r.rules else []
            r.flows, r.stray_flows, r.stray_examples, r.silent = audit_flows(
                out_dir / r.pcap, rules, (r.label, r.family), set(r.involved), hostile)
            for attack in r.silent:
                progress(f"warning: {r.name}: no flow shows the {attack} of its flow rules: did the tool run? "
                         f"(logs/{r.name}.log)")
            if r.stray_flows:
                progress(f"warning: {r.name}: {r.stray_flows} flows may be mislabeled, e.g. "
                         f"{', '.join(r.stray_examples[:3])}")
    total = sum(r.pcap_bytes for r in results)
    report = RunReport(out_dir=out_dir, results=results, seconds=time.monotonic() - started,
                       interrupted=interrupted, total_bytes=total)
    _write_manifest(out_dir, results, options.seed)
    _write_metadata(report, options, chosen, plan)
    if interrupted:
        raise KeyboardInterrupt
    return report


def _run_scenario(lab: Lab, services: Any, sc: Scenario, options: Options) -> ScenarioResult:
    rng = random.Random(f"iotscan-lab:{options.seed}:{sc.name}")
    segment = rng.choice(LAN_SEGMENTS)
    segment = sc.segment or segment
    out_dir = options.out_dir
    pcap = Path("pcaps") / f"{sc.name}.pcap"
    with open(out_dir / "logs" / f"{sc.name}.log", "wb") as log:
        ctx = ScenarioContext(lab, services, segment, rng, options.duration_scale, log)
        started = time.monotonic()
        capture = Capture(lab, segment, out_dir / pcap)
        try:
            sc.func(ctx)
        finally:
            ctx.close()
            time.sleep(1.0)  # the last answers and FINs
            packets, dropped = capture.stop()
        log.write(f"\n# tcpdump: {' '.join(capture.stats.split())}\n".encode())
    rules_path = phases_path = None
    if sc.mixed:
        rules_path = Path("rules") / f"{sc.name}.csv"
        write_rules(out_dir / rules_path, ctx.rules)
    if ctx.phases:
        phases_path = Path("phases") / f"{sc.name}.csv"
        write_phases(out_dir / phases_path, ctx.phases)
    return ScenarioResult(name=sc.name, label=sc.label, family=sc.family, segment=segment, pcap=str(pcap),
                          rules=str(rules_path) if rules_path else None, seconds=round(time.monotonic() - started, 1),
                          packets=packets, dropped=dropped, pcap_bytes=(out_dir / pcap).stat().st_size,
                          notes=ctx.notes, commands=ctx.commands, involved=sorted(ctx.involved),
                          phases=str(phases_path) if phases_path else None)


def _write_metadata(report: RunReport, options: Options, chosen: Sequence[Scenario], plan: Any) -> None:
    out = report.out_dir
    versions = tool_versions(needed_tools(chosen))
    meta = {
        "generator": f"iotscan {__version__} lab",
        "command": options.command_line,
        "seed": options.seed,
        "duration_scale": options.duration_scale,
        "interrupted": report.interrupted,
        "seconds": round(report.seconds, 1),
        "bytes": report.total_bytes,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "package_versions": versions,
        "networks": {k: str(v) for k, v in plan.networks.items()},
        "hosts": {h.role: {"ip": str(h.ip), "mac": h.mac} for h in plan.hosts.values()},
        "routers": {k: {"ip": str(v), "mac": plan.router_macs[k]} for k, v in plan.router.items()},
        "scenarios": [r.__dict__ for r in report.results],
    }
    (out / "lab.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    (out / "README.md").write_text(_readme(report, options, chosen, plan, versions))


def _readme(report: RunReport, options: Options, chosen: Sequence[Scenario], plan: Any,
            versions: dict[str, str]) -> str:
    done = {r.name: r for r in report.results}
    lines = [
        "# iotscan attack-lab captures",
        "",
        "Made by `iotscan lab generate`: benign IoT traffic and attacks run with real tools between network "
        "namespaces that have no link to the host and no route out. Each scenario was recorded with tcpdump on "
        "the bridge of one IoT LAN (as a switch's mirror port would see it) into its own pcap.",
        "",
        f"- command: `{options.command_line or 'iotscan lab generate'}`",
        f"- seed: {options.seed} (same seed, same addresses, credentials, rates and choices; timing still varies)",
        f"- duration scale: {options.duration_scale}",
        f"- run time: {report.seconds:.0f} s; captures: {report.total_bytes / 1e6:.1f} MB"
        + ("; **the run was interrupted: only the scenarios listed below finished**" if report.interrupted else ""),
        f"- networks: LAN1 {plan.networks['lan1']}, LAN2 {plan.networks['lan2']}, WAN (RFC 6598 space standing in "
        f"for the Internet) {plan.networks['wan']}; hosts and MACs in `lab.json`",
        "",
        "`MANIFEST.csv` has the columns of iotscan's shared dataset manifest (path, label, family, label_source, "
        "note). `whole-capture`: every flow of the pcap has the row's label. `flow-rules:FILE`: FILE is a CSV "
        "(src_ip, dst_ip, protocol, dst_port, label, family); a flow takes the label of the first rule whose "
        "non-empty fields equal its initiator, responder, IP protocol number and responder port, and the row's "
        "label when no rule matches. `logs/` has every command run and its output; `lab.json` the details.",
        "",
        "Families: ddos (floods from many or spoofed sources), dos (floods and slowloris from one source), scan, "
        "bruteforce, exploit (HTTP command injection and path traversal), spoofing (ARP), c2.",
        "",
        "| scenario | label | family | LAN | seconds | packets | flows | what ran |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for sc in chosen:
        r = done.get(sc.name)
        if r is None:
            continue
        flows = ", ".join(f"{k} {v}" for k, v in sorted(r.flows.items())) or "-"
        family = r.family or ("per flow" if r.rules else "")
        lines.append(f"| {sc.name} | {r.label if not r.rules else 'per flow'} | {family} | {r.segment} | "
                     f"{r.seconds:.0f} | {r.packets if r.packets is not None else '?'} | {flows} | "
                     f"{sc.description} |")
    doubtful = [r for r in report.results if r.stray_flows]
    lines += ["", "Label audit (a benign-labeled flow touching an attacker's address, or a flow of a pure attack "
              "capture touching none of the attack's addresses): "
              + ("; ".join(f"{r.name}: {r.stray_flows} doubtful, e.g. {', '.join(r.stray_examples[:2])}"
                           for r in doubtful) if doubtful else
                 ("no doubtful flow." if options.count_flows and not report.interrupted else "not run."))]
    silent = [f"{r.name}: {attack}" for r in report.results for attack in r.silent]
    if silent:  # a tool that did not run (a crash, a missing applet) leaves its phase without a flow
        lines += ["", "**Attacks of the flow rules that no flow shows** (see the scenario's log): " + "; ".join(silent)]
    lines += ["", "## Tools (Debian packages)", ""]
    lines += [f"- {name} {version}" for name, version in sorted(versions.items())]
    lines += ["", "## Known limits", "",
              "- ARP spoofing is a link-layer attack: flow features see it only as the victims' packets crossing "
              "the LAN twice (once to the attacker's MAC, once forwarded, TTL one lower).",
              "- The devices are Linux namespaces with IoT services, not real devices: TCP/IP stacks, TTLs and "
              "timings are those of this host's kernel.",
              "- Floods are bounded to tens of thousands of packets; real ones last longer and come from more "
              "addresses.",
              ""]
    return "\n".join(lines)


def command_line(argv: Sequence[str] | None = None) -> str:
    return shlex.join(["iotscan", *(argv if argv is not None else sys.argv[1:])])
