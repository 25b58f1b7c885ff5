"""What a scenario of the lab is: its context (lab, LAN, random stream, bounded processes), its labels
(flow rules), and the catalogue it registers in (the scenarios themselves are in iotscan.lab.scenarios).

A scenario runs on one IoT LAN (drawn per scenario), whose bridge is what gets recorded. It picks
its attacker, victims, rates and sizes from its own random stream (the run's seed and its name),
so a run is reproducible and two scenarios of one run do not look alike. Every program it starts
is bounded twice: by its own packet count, attempt count or deadline, and by a timeout after
which the lab kills it.

Labels: a pure scenario's capture holds only its own traffic and is labeled as a whole. A mixed
scenario adds attacks to benign background traffic and writes flow rules (attacker and victim
addresses, protocol, port) naming the attack flows, in both directions; other flows are benign.
"""

from __future__ import annotations

import csv
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from iotscan.lab.netns import Host, Lab
from iotscan.lab.services import (
    Services,
    agent_argv,
    agent_env,
)

FAMILIES = ("ddos", "dos", "scan", "bruteforce", "exploit", "spoofing", "c2")
RULE_FIELDS = ("src_ip", "dst_ip", "protocol", "dst_port", "label", "family")


@dataclass(frozen=True)
class FlowRule:
    """One row of a flow-rules file: flows from src to dst (empty = any) get this label."""

    src_ip: str = ""
    dst_ip: str = ""
    protocol: int | None = None
    dst_port: int | None = None
    label: str = "attack"
    family: str = ""

    def row(self) -> dict[str, str]:
        return {"src_ip": self.src_ip, "dst_ip": self.dst_ip,
                "protocol": "" if self.protocol is None else str(self.protocol),
                "dst_port": "" if self.dst_port is None else str(self.dst_port),
                "label": self.label, "family": self.family}

    def matches(self, src_ip: str, dst_ip: str, protocol: int, dst_port: int) -> bool:
        return ((not self.src_ip or self.src_ip == src_ip) and (not self.dst_ip or self.dst_ip == dst_ip)
                and (self.protocol is None or self.protocol == protocol)
                and (self.dst_port is None or self.dst_port == dst_port))


def matching_rule(rules: Sequence[FlowRule], src_ip: str, dst_ip: str, protocol: int, dst_port: int) -> int | None:
    """The index of the first rule a flow matches."""
    return next((i for i, rule in enumerate(rules) if rule.matches(src_ip, dst_ip, protocol, dst_port)), None)


def label_flow(rules: Sequence[FlowRule], default: tuple[str, str], src_ip: str, dst_ip: str, protocol: int,
               dst_port: int) -> tuple[str, str]:
    """(label, family) of a flow: the first matching rule's, else the manifest row's."""
    i = matching_rule(rules, src_ip, dst_ip, protocol, dst_port)
    return (rules[i].label, rules[i].family) if i is not None else default


class ScenarioContext:
    """What a scenario runs with: the lab, its LAN, its random stream, and bounded process helpers."""

    def __init__(self, lab: Lab, services: Services, segment: str, rng: random.Random, scale: float,
                 log: IO[bytes]) -> None:
        self.lab = lab
        self.services = services
        self.segment = segment
        self.rng = rng
        self.scale = scale
        self.log = log
        self.notes: list[str] = []
        self.rules: list[FlowRule] = []
        self.commands: list[str] = []
        self.involved: set[str] = set()  # addresses every flow of a pure attack capture must touch
        self.phases: list[dict[str, Any]] = []  # labelled phases with their times (the infection scenarios)
        self._background: list[subprocess.Popen[Any]] = []
        self._env = agent_env()

    # -- hosts and addresses ---------------------------------------------------------------------

    def role(self, kind: str) -> str:
        """A full role from a kind of this scenario's LAN (hub, cam, sensor, phone, bot) or a role."""
        return kind if kind in self.lab.plan.hosts else f"{self.segment}-{kind}"

    def host(self, kind: str) -> Host:
        return self.lab.plan.host(self.role(kind))

    def ip(self, kind: str) -> str:
        return self.lab.require_target(self.host(kind).ip)

    @property
    def network(self) -> str:
        return self.lab.require_target(self.lab.plan.networks[self.segment])

    def attacker(self, choices: Sequence[str] = ("atk1", "atk2", "bot")) -> Host:
        host = self.host(self.rng.choice(list(choices)))
        self.involve(host)
        return host

    def involve(self, *hosts: Host) -> None:
        """Mark hosts whose addresses the attack's flows carry (checked after the run)."""
        self.involved.update(str(h.ip) for h in hosts)

    def secs(self, base: float, minimum: float = 1.0) -> float:
        return max(minimum, base * self.scale)

    def attack_rules(self, attacker: Host, victim: Host | str, family: str, protocol: int | None = None,
                     port: int | None = None) -> None:
        """Flow rules for one attacker-victim pair: the attack flows and the victim's answers to them."""
        a = str(attacker.ip)
        v = str(victim.ip) if isinstance(victim, Host) else victim
        self.rules.append(FlowRule(a, v, protocol, port, "attack", family))
        self.rules.append(FlowRule(v, a, None, None, "attack", family))

    # -- processes -------------------------------------------------------------------------------

    def _record(self, role: str, argv: Sequence[str]) -> None:
        shown = " ".join(str(a) for a in argv)
        self.commands.append(f"[{role}] {shown}")
        self.log.write(f"\n$ [{role}] {shown}\n".encode())
        self.log.flush()

    def start(self, role: str, argv: Sequence[Any], agent: bool = False) -> subprocess.Popen[Any]:
        """Start a bounded program in the background (stopped at the end of the scenario at the latest)."""
        argv = [str(a) for a in argv]
        role = self.role(role)
        self._record(role, argv)
        full = agent_argv(argv[0], *argv[1:]) if agent else argv
        proc = self.lab.spawn(role, full, stdout=self.log, stderr=subprocess.STDOUT,
                              env=self._env if agent else None)
        self._background.append(proc)
        return proc

    def agent(self, role: str, name: str, *args: Any, seed: bool = True) -> subprocess.Popen[Any]:
        extra = ["--seed", self.rng.randrange(1 << 30)] if seed else []
        return self.start(role, [name, *args, *extra], agent=True)

    def run(self, role: str, argv: Sequence[Any], timeout: float) -> int | None:
        """Run a program to its end, or stop it after timeout seconds."""
        proc = self.start(role, argv)
        return self.wait([proc], timeout)

    def wait(self, procs: Sequence[subprocess.Popen[Any]], timeout: float) -> int | None:
        """Wait for procs to end on their own for at most timeout seconds; stop those still running."""
        deadline = time.monotonic() + timeout
        code = None
        for proc in procs:
            try:
                code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.write(f"\n# stopped after {timeout:.0f}s: pid {proc.pid}\n".encode())
                code = self.lab.stop(proc)
        return code

    def phase(self, name: str, family: str, host: Host, started: float, note: str = "") -> None:
        """Label a phase that ran from ``started`` (time.time()) until now."""
        self.phases.append({"phase": name, "family": family, "host_ip": str(host.ip), "host_mac": host.mac,
                            "start_ms": int(started * 1000), "end_ms": int(time.time() * 1000), "note": note})

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def close(self) -> None:
        """Stop whatever the scenario left running."""
        for proc in self._background:
            self.lab.stop(proc, grace=2.0)
        self._background.clear()


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str  # "benign" or "attack" (a mixed scenario's rows default to benign)
    family: str
    seconds: float  # nominal duration at --duration-scale 1
    tools: tuple[str, ...]
    description: str
    func: Callable[[ScenarioContext], None] = field(repr=False)
    mixed: bool = False
    segment: str | None = None  # the LAN it always runs on (None: drawn per run)
    on_request: bool = False  # run only when named (not part of the default run): the long infection scenarios


CATALOGUE: dict[str, Scenario] = {}


ScenarioFunc = Callable[[ScenarioContext], None]


def scenario(name: str, label: str, family: str, seconds: float, tools: Sequence[str], mixed: bool = False,
             description: str | None = None, segment: str | None = None,
             on_request: bool = False) -> Callable[[ScenarioFunc], ScenarioFunc]:
    """Register a scenario; its description is the function's docstring unless given."""
    def register(func: ScenarioFunc) -> ScenarioFunc:
        doc = " ".join((description or func.__doc__ or name).split())
        CATALOGUE[name] = Scenario(name, label, family, seconds, tuple(tools), doc, func, mixed, segment, on_request)
        return func
    return register


def select(names: Sequence[str] | None) -> list[Scenario]:
    """The scenarios to run, in catalogue order; names may be families or prefixes like 'scan-'. Without names,
    all but those run only on request (named: the infection scenarios)."""
    if not names:
        return [s for s in CATALOGUE.values() if not s.on_request]
    chosen: list[Scenario] = []
    for name in names:
        matched = [s for s in CATALOGUE.values() if s.name == name or s.family == name
                   or (s.label == name and not s.mixed and not s.on_request)
                   or (name.endswith("-") and s.name.startswith(name))]
        if not matched:
            raise KeyError(name)
        chosen += [s for s in matched if s not in chosen]
    return [s for s in CATALOGUE.values() if s in chosen]


PHASE_FIELDS = ("phase", "family", "host_ip", "host_mac", "start_ms", "end_ms", "note")


def write_phases(path: Path, phases: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PHASE_FIELDS, lineterminator="\n")
        writer.writeheader()
        for phase in phases:
            writer.writerow(phase)


def write_rules(path: Path, rules: Sequence[FlowRule]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RULE_FIELDS, lineterminator="\n")
        writer.writeheader()
        for rule in rules:
            writer.writerow(rule.row())
