"""Network namespaces joined by veth pairs, with no link to the host namespace and no route out.

The lab is three Ethernet segments (two IoT LANs and a stand-in for the Internet), each a bridge
in one "switch" namespace, and a router namespace between them. Every other host is a namespace
of its own with one veth into its segment. Veth pairs are created directly between lab
namespaces (``ip -n A link add ... peer ... netns B``), so no interface ever exists in the host
namespace, and routes name the lab's subnets only: nothing has a default route.

``check_isolation`` proves that at run time, before every scenario: each namespace holds only
the interfaces the lab made, every veth's peer sits in a lab namespace, every route and address
lies inside the lab's subnets. ``require_target`` is the gate every scenario target goes through.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from iotscan.errors import CaptureError

NAME_PREFIX = "iotlab-"
_NS_NAME = re.compile(r"^iotlab-(\d+)-")
SWITCH = "sw"
ROUTER = "gw"
LAN_SEGMENTS = ("lan1", "lan2")
WAN = "wan"
SEGMENTS = (*LAN_SEGMENTS, WAN)
# Hosts on each IoT LAN: two devices (the victims), two clients, one compromised device, and two
# quiet devices that only answer (so scans and sweeps find more than the victims).
LAN_ROLES = ("hub", "cam", "sensor", "phone", "bot", "plug", "tv")
# Hosts on the stand-in Internet: the vendor cloud (DNS, NTP, firmware), a C2 server, two attackers.
WAN_ROLES = ("cloud", "cnc", "atk1", "atk2")
# The WAN uses the shared address space of RFC 6598 (carrier-grade NAT): never routed on the
# Internet, and not "private" by Python's ipaddress, so it looks remote to is_local_address.
_WAN_POOL = ipaddress.ip_network("100.64.0.0/10")
_LAN_POOLS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("172.16.0.0/12"),
              ipaddress.ip_network("192.168.0.0/16"))
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
IP_TIMEOUT_S = 20


class IsolationError(CaptureError):
    """The lab is not isolated as it must be: the run stops before sending anything."""


@dataclass(frozen=True)
class Host:
    """One lab host: a namespace with one interface (eth0) in one segment."""

    role: str  # "lan1-hub", "atk1"...
    segment: str
    ip: ipaddress.IPv4Address
    mac: str

    @property
    def kind(self) -> str:
        """The role without its segment: hub, cam, sensor, phone, bot, cloud, cnc, atk1, atk2."""
        return self.role.split("-", 1)[1] if "-" in self.role else self.role


@dataclass(frozen=True)
class Plan:
    """Addresses of one lab, drawn from a seed: subnets, router addresses and hosts."""

    networks: dict[str, ipaddress.IPv4Network]
    router: dict[str, ipaddress.IPv4Address]  # segment -> the router's address on it
    router_macs: dict[str, str]
    hosts: dict[str, Host]  # role -> host

    def host(self, role: str) -> Host:
        return self.hosts[role]

    def in_segment(self, segment: str) -> list[Host]:
        return [h for h in self.hosts.values() if h.segment == segment]

    def contains(self, target: ipaddress.IPv4Address | ipaddress.IPv4Network) -> bool:
        if isinstance(target, ipaddress.IPv4Network):
            return any(target.subnet_of(net) for net in self.networks.values())
        return any(target in net for net in self.networks.values())

    def require_target(self, target: str | ipaddress.IPv4Address | ipaddress.IPv4Network) -> str:
        """The target as text, if it lies inside the lab's subnets; otherwise refuse to run."""
        text = str(target)
        try:
            value = ipaddress.ip_network(text, strict=True) if "/" in text else ipaddress.ip_address(text)
        except ValueError:
            raise IsolationError(f"refusing to target {text!r}: not an IPv4 address or network") from None
        if not isinstance(value, ipaddress.IPv4Address | ipaddress.IPv4Network) or not self.contains(value):
            raise IsolationError(f"refusing to target {text}: outside the lab's subnets")
        return text


def _random_mac(rng: random.Random) -> str:
    first = (rng.randrange(256) & 0xFC) | 0x02  # locally administered, unicast
    return ":".join(f"{b:02x}" for b in [first, *(rng.randrange(256) for _ in range(5))])


def _random_subnet(rng: random.Random, pool: ipaddress.IPv4Network, prefix: int,
                   taken: Sequence[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    count = 2 ** (prefix - pool.prefixlen)
    for _ in range(1000):
        index = rng.randrange(count)
        net = ipaddress.ip_network((int(pool.network_address) + index * 2 ** (32 - prefix), prefix))
        if not any(net.overlaps(other) for other in taken):
            return net
    raise CaptureError(f"no free /{prefix} left in {pool} for the lab")


def plan_lab(seed: int, avoid: Iterable[ipaddress.IPv4Network] = ()) -> Plan:
    """Draw the lab's subnets, addresses and MACs from the seed (same seed, same lab).

    The two LANs come from different RFC 1918 blocks and the WAN from RFC 6598 space, so one run
    already spans several subnets and different seeds give different ones; ``avoid`` keeps the
    host's own networks out, so a lab address is never also a real one here.
    """
    rng = random.Random(f"iotscan-lab-plan:{seed}")
    taken: list[ipaddress.IPv4Network] = list(avoid)
    networks: dict[str, ipaddress.IPv4Network] = {}
    for segment, pool in zip(LAN_SEGMENTS, rng.sample(_LAN_POOLS, len(LAN_SEGMENTS)), strict=True):
        networks[segment] = _random_subnet(rng, pool, 24, taken)
        taken.append(networks[segment])
    networks[WAN] = _random_subnet(rng, _WAN_POOL, 16, taken)

    router: dict[str, ipaddress.IPv4Address] = {}
    router_macs: dict[str, str] = {}
    hosts: dict[str, Host] = {}
    for segment, net in networks.items():
        roles = [f"{segment}-{r}" for r in LAN_ROLES] if segment != WAN else list(WAN_ROLES)
        size = net.num_addresses
        router_index = rng.choice([1, size - 2, rng.randrange(2, size - 2)])
        used = {router_index}
        indices = []
        while len(indices) < len(roles):
            index = rng.randrange(2, size - 2)
            if index not in used and (segment != WAN or index % 256 not in (0, 255)):
                used.add(index)
                indices.append(index)
        router[segment] = net.network_address + router_index
        router_macs[segment] = _random_mac(rng)
        for role, index in zip(roles, indices, strict=True):
            hosts[role] = Host(role=role, segment=segment, ip=net.network_address + index, mac=_random_mac(rng))
    return Plan(networks=networks, router=router, router_macs=router_macs, hosts=hosts)


def host_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of the host namespace's addresses and routes (to keep the lab clear of them)."""
    nets: list[ipaddress.IPv4Network] = []
    with contextlib.suppress(CaptureError):
        for entry in ip_json("-4", "addr", "show"):
            for info in entry.get("addr_info", []):
                nets.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
        for route in ip_json("-4", "route", "show"):
            if route.get("dst", "default") != "default":
                nets.append(ipaddress.ip_network(route["dst"], strict=False))
    return [n for n in nets if not n.subnet_of(_LOOPBACK)]


def ip(*args: str) -> str:
    """Run iproute2's ``ip``; a failure is a CaptureError with its message."""
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except FileNotFoundError:
        raise CaptureError("the `ip` command is missing: install the iproute2 package") from None
    except subprocess.TimeoutExpired:
        raise CaptureError(f"`ip {' '.join(args)}` did not finish in {IP_TIMEOUT_S}s") from None
    if proc.returncode != 0:
        raise CaptureError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def ip_json(*args: str) -> list[dict[str, Any]]:
    out = ip("-j", *args).strip()
    return json.loads(out) if out else []


def lab_namespaces() -> list[str]:
    """Every namespace named like a lab's, from any run."""
    try:
        names = [entry["name"] for entry in ip_json("netns", "list")]
    except CaptureError:
        return []
    return [n for n in names if n.startswith(NAME_PREFIX)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_namespace_processes(ns: str) -> None:
    """SIGKILL every process still inside one namespace, by pid."""
    with contextlib.suppress(CaptureError):
        for line in ip("netns", "pids", ns).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line), signal.SIGKILL)


def cleanup_stale() -> list[str]:
    """Remove namespaces and work folders left by lab runs whose process is gone (a crash, a kill -9)."""
    removed = []
    for ns in lab_namespaces():
        match = _NS_NAME.match(ns)
        if match and _pid_alive(int(match.group(1))) and int(match.group(1)) != os.getpid():
            continue  # another lab run is alive: leave its namespaces alone
        kill_namespace_processes(ns)
        with contextlib.suppress(CaptureError):
            ip("netns", "del", ns)
            removed.append(ns)
    tmp = Path(tempfile.gettempdir())
    for folder in tmp.glob(f"{NAME_PREFIX}*"):
        match = _NS_NAME.match(folder.name)
        if match and folder.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
    return removed


def _sysctl_args(settings: dict[str, str]) -> list[str]:
    return ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())]


# Quiet, IPv4-only hosts: no IPv6 (router solicitations, MLD) and no ICMP redirects in the captures.
_HOST_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.default.send_redirects": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
# Offloads off on every veth: captures then hold wire-sized frames with real checksums,
# as a SPAN port would, instead of 64 KB GSO super-frames.
_ETHTOOL_OFF = ["tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off", "sg", "off"]


@dataclass
class Lab:
    """The namespaces of one run, their processes, and their teardown."""

    plan: Plan
    prefix: str = field(default_factory=lambda: f"{NAME_PREFIX}{os.getpid()}-")
    workdir: Path = field(init=False)
    _created: list[str] = field(default_factory=list, init=False)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, init=False)
    _expected_links: dict[str, set[str]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=self.prefix))

    # -- names ---------------------------------------------------------------------------------

    def ns(self, role: str) -> str:
        return f"{self.prefix}{role}"

    @property
    def namespaces(self) -> list[str]:
        return list(self._created)

    def bridge(self, segment: str) -> str:
        return f"br-{segment}"

    # -- building --------------------------------------------------------------------------------

    def create(self) -> None:
        """Build the namespaces, bridges, veth pairs, addresses and lab-only routes."""
        roles = [SWITCH, ROUTER, *self.plan.hosts]
        for role in roles:
            name = self.ns(role)
            ip("netns", "add", name)
            self._created.append(name)
            self._expected_links[name] = {"lo"}
            self.exec_quiet(role, _sysctl_args(_HOST_SYSCTLS))
            ip("-n", name, "link", "set", "lo", "up")
        sw = self.ns(SWITCH)
        for segment in SEGMENTS:
            bridge = self.bridge(segment)
            ip("-n", sw, "link", "add", bridge, "type", "bridge", "stp_state", "0", "mcast_snooping", "0")
            ip("-n", sw, "link", "set", bridge, "up")
            self._expected_links[sw].add(bridge)
        # The router: one leg per segment, forwarding between them.
        self.exec_quiet(ROUTER, _sysctl_args({"net.ipv4.ip_forward": "1"}))
        for segment in SEGMENTS:
            net = self.plan.networks[segment]
            self._attach(ROUTER, f"gw-{segment}", segment, self.plan.router_macs[segment],
                         f"{self.plan.router[segment]}/{net.prefixlen}")
        for index, host in enumerate(self.plan.hosts.values()):
            net = self.plan.networks[host.segment]
            self._attach(host.role, f"h{index}", host.segment, host.mac, f"{host.ip}/{net.prefixlen}",
                         inner="eth0")
            via = str(self.plan.router[host.segment])
            for segment, other in self.plan.networks.items():
                if segment != host.segment:
                    ip("-n", self.ns(host.role), "route", "add", str(other), "via", via, "dev", "eth0")

    def _attach(self, role: str, port: str, segment: str, mac: str, cidr: str, inner: str | None = None) -> None:
        """One veth pair: ``port`` on the segment's bridge, ``inner`` in the role's namespace."""
        sw, name = self.ns(SWITCH), self.ns(role)
        inner = inner or segment
        ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", inner, "netns", name)
        self._expected_links[sw].add(port)
        self._expected_links[name].add(inner)
        ip("-n", name, "link", "set", inner, "address", mac)
        ip("-n", name, "addr", "add", cidr, "dev", inner)
        self.exec_quiet(SWITCH, ["ethtool", "-K", port, *_ETHTOOL_OFF])
        self.exec_quiet(role, ["ethtool", "-K", inner, *_ETHTOOL_OFF])
        ip("-n", sw, "link", "set", port, "master", self.bridge(segment), "up")
        ip("-n", name, "link", "set", inner, "up")

    # -- isolation -------------------------------------------------------------------------------

    def check_isolation(self) -> None:
        """Raise IsolationError unless every lab namespace is closed to the outside."""
        problems: list[str] = []
        lab_names = set(self._created)
        nets = list(self.plan.networks.values())

        def inside(net: ipaddress.IPv4Network) -> bool:
            return net.subnet_of(_LOOPBACK) or any(net.subnet_of(n) for n in nets)

        present = set(lab_namespaces())
        for name in self._created:
            if name not in present:
                problems.append(f"namespace {name} vanished")
                continue
            for route in ip_json("-n", name, "-4", "route", "show", "table", "all"):
                dst = route.get("dst", "default")
                net = ipaddress.ip_network("0.0.0.0/0" if dst == "default" else dst, strict=False)
                if not inside(net):
                    problems.append(f"{name} has a route to {dst}")
            for route in ip_json("-n", name, "-6", "route", "show", "table", "all"):
                if route.get("dst", "default") in ("default", "::/0"):
                    problems.append(f"{name} has an IPv6 default route")
            ids = {e.get("nsid"): e.get("name") for e in ip_json("-n", name, "netns", "list-id")}
            for link in ip_json("-n", name, "-d", "link", "show"):
                ifname = link.get("ifname")
                kind = (link.get("linkinfo") or {}).get("info_kind")
                if ifname not in self._expected_links.get(name, set()):
                    problems.append(f"{name} has an interface the lab did not make: {ifname}")
                elif kind == "veth":
                    peer_ns = ids.get(link.get("link_netnsid"))
                    if peer_ns not in lab_names:
                        problems.append(f"{name}/{ifname} is linked to a namespace outside the lab "
                                        f"({peer_ns or 'unnamed, e.g. the host'})")
                elif ifname != "lo" and kind != "bridge":
                    problems.append(f"{name}/{ifname} is a {kind or 'physical'} interface")
            for entry in ip_json("-n", name, "-4", "addr", "show"):
                for info in entry.get("addr_info", []):
                    net = ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False)
                    if not inside(net):
                        problems.append(f"{name} has address {info['local']} outside the lab")
        if problems:
            raise IsolationError("lab isolation check failed, refusing to run: " + "; ".join(problems[:5]))

    def require_target(self, target: str | ipaddress.IPv4Address | ipaddress.IPv4Network) -> str:
        return self.plan.require_target(target)

    # -- processes -------------------------------------------------------------------------------

    def command(self, role: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *argv]

    def exec_quiet(self, role: str, argv: Sequence[str]) -> None:
        proc = subprocess.run(self.command(role, argv), capture_output=True, text=True, timeout=IP_TIMEOUT_S)
        if proc.returncode != 0:
            raise CaptureError(f"`{' '.join(argv)}` in {role} failed: {proc.stderr.strip() or proc.returncode}")

    def spawn(self, role: str, argv: Sequence[str], *, stdout: IO[Any] | int | None = subprocess.DEVNULL,
              stderr: IO[Any] | int | None = subprocess.STDOUT, env: dict[str, str] | None = None,
              stdin: IO[Any] | int | None = subprocess.DEVNULL) -> subprocess.Popen[Any]:
        """Start argv inside the role's namespace, in a process group of its own (so it can be stopped
        with its children, and a Ctrl-C on the terminal reaches only us)."""
        if role.startswith(NAME_PREFIX) or self.ns(role) not in self._created:
            raise CaptureError(f"no lab namespace for {role}")
        # cwd: tools that drop files where they run (hydra.restore) drop them in the lab's work folder.
        proc = subprocess.Popen(self.command(role, argv), stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                                cwd=self.workdir, start_new_session=True)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 3.0) -> int | None:
        """Signal the process group, wait up to grace seconds, then SIGKILL it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
        else:  # the leader is gone; children of its group may not be
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def destroy(self) -> None:
        """Stop every process, delete every namespace and the work folder. Safe to call twice."""
        procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        self._procs.clear()
        for name in reversed(self._created):
            kill_namespace_processes(name)
        errors = []
        for name in reversed(self._created):
            try:
                ip("netns", "del", name)
            except CaptureError as exc:
                errors.append(exc.message)
        self._created.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise CaptureError("lab teardown incomplete: " + "; ".join(errors[:3]))
