"""`iotscan inspect`: one flow of a capture, down to its packets, dissected by tshark through pyshark.

Two passes over the capture, each at the speed of its tool, then a small one:

1. NFStream (iotscan.capture.source.FlowSource + records.flow_record) finds the flow. ``flow_id`` is
   deterministic (capture name, flow key, first packet), so re-metering the capture with the
   same timeouts as ``analyze`` gives the same ids; the pass stops as soon as the flow is found,
   and meters only the packets of the 5-tuple when one is given (a BPF filter).
2. tshark reads the capture with a display filter made of the flow's 5-tuple, VLAN and time
   window and prints the frame number of each match (select_frames); it is stopped as soon as it
   has read past the flow's end (see flows_filter) or ``--limit`` is reached.
3. editcap cuts those frames out into a temporary file and tshark dissects only them into PDML
   (dissect_frames), so only the flow's packets get full protocol trees and reach Python, where
   pyshark turns each into a Packet and this module into a flat ``packet`` record. (tshark
   writing PDML straight from the capture would build the full tree of every packet it reads:
   twice the cost of step 2.)

tshark is run here, not through ``pyshark.FileCapture``: FileCapture kills tshark at end of
output before reading its exit status (a damaged capture could look complete), raises again from
``close()`` and ``__del__``, looks for tshark in a ``config.ini`` of the current directory, and
relies on asyncio child watchers (removed in Python 3.14). The command line of step 3 is the one
pyshark builds (``tshark -l -n -T pdml -r FILE``) and each packet goes through pyshark's own
PDML parser, so the Packet/XmlLayer objects are pyshark's.

pyshark and tshark are needed by this command only: pyshark is imported lazily, and a missing
tshark is reported as a capture-tooling error (exit code 3) with the command that installs it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import IO, Any

from iotscan.capture.side_pass import bpf_forms
from iotscan.capture.source import FlowSource, MeterConfig
from iotscan.errors import CaptureError, InputError
from iotscan.output.records import community_id, flow_record, iso_timestamp_text, summary_record
from iotscan.stage import Event, SourceInfo, Stage

INSTALL_HINT = "install it with: sudo apt-get install tshark (or run ./install.sh)"
TSHARK_ENV = "IOTSCAN_TSHARK"  # explicit path to tshark, for installs outside PATH

_PROTOCOL_NAMES = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132, "gre": 47,
                   "esp": 50, "igmp": 2}
_PORT_PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
_PROTOCOL_LABELS = {**_PORT_PROTOCOLS, 1: "icmp", 58: "icmpv6"}
_READ_CHUNK = 1 << 16
_EXIT_WAIT_S = 10.0  # after tshark closed its output, how long it may take to exit
_KILL_WAIT_S = 2.0


# -- which flow -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FiveTuple:
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    protocol: int

    def __str__(self) -> str:
        proto = _PROTOCOL_LABELS.get(self.protocol, self.protocol)
        return f"{_endpoint(self.src_ip, self.src_port)}-{_endpoint(self.dst_ip, self.dst_port)}/{proto}"

    def matches(self, record: dict[str, Any]) -> bool:
        ours = (self.src_ip, self.src_port, self.dst_ip, self.dst_port)
        theirs = (record["src_ip"], record["src_port"], record["dst_ip"], record["dst_port"])
        reverse = (record["dst_ip"], record["dst_port"], record["src_ip"], record["src_port"])
        return record["protocol"] == self.protocol and ours in (theirs, reverse)


def five_tuple_bpf(t: FiveTuple) -> str:
    """A BPF filter passing the packets of a 5-tuple (both directions), so that the flow pass meters nothing
    else. Tunnelled packets do not pass: find_flows then meters everything."""
    ipv6 = ":" in t.src_ip
    proto = {**_PORT_PROTOCOLS, 1: "icmp", 58: "icmp6"}.get(t.protocol, f"{'ip6' if ipv6 else 'ip'} proto {t.protocol}")
    match = f"{proto} and host {t.src_ip} and host {t.dst_ip}"
    if t.protocol in _PORT_PROTOCOLS:
        match += f" and port {t.src_port} and port {t.dst_port}"
    return match


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<v4>[0-9.]+))(?::(?P<port>\d+))?$")


def _parse_endpoint(text: str, whole: str) -> tuple[str, int]:
    m = _ENDPOINT.match(text.strip())
    if not m:
        hint = " (write IPv6 addresses in brackets: [2001:db8::1]:443)" if text.count(":") > 1 else ""
        raise InputError(f"bad 5-tuple {whole!r}: cannot read the endpoint {text!r}{hint}")
    raw_ip = m.group("v6") or m.group("v4")
    try:
        ip = ipaddress.ip_address(raw_ip)
    except ValueError:
        raise InputError(f"bad 5-tuple {whole!r}: {raw_ip!r} is not an IP address") from None
    if m.group("v6") and ip.version != 6:
        raise InputError(f"bad 5-tuple {whole!r}: brackets are for IPv6 addresses")
    port = int(m.group("port") or 0)
    if port > 65535:
        raise InputError(f"bad 5-tuple {whole!r}: port {port} is out of range")
    return str(ip), port


def parse_five_tuple(text: str) -> FiveTuple:
    """SRC[:PORT]-DST[:PORT]/PROTO, IPv6 in brackets; PROTO is a name (tcp, udp, icmp...) or a number."""
    head, sep, proto_text = text.strip().rpartition("/")
    if not sep or not head:
        raise InputError(f"bad 5-tuple {text!r}: expected SRC:PORT-DST:PORT/PROTO, e.g. "
                         "192.168.1.10:5353-224.0.0.251:5353/udp")
    proto_text = proto_text.strip().lower()
    if proto_text.isdigit() and int(proto_text) < 256:
        protocol = int(proto_text)
    elif proto_text in _PROTOCOL_NAMES:
        protocol = _PROTOCOL_NAMES[proto_text]
    else:
        raise InputError(f"bad 5-tuple {text!r}: unknown protocol {proto_text!r} (tcp, udp, icmp, icmpv6, sctp "
                         "or a number)")
    parts = head.split("-")
    if len(parts) != 2:
        raise InputError(f"bad 5-tuple {text!r}: expected exactly one '-' between the two endpoints")
    (src_ip, src_port), (dst_ip, dst_port) = (_parse_endpoint(p, text) for p in parts)
    if ipaddress.ip_address(src_ip).version != ipaddress.ip_address(dst_ip).version:
        raise InputError(f"bad 5-tuple {text!r}: mixes IPv4 and IPv6")
    if protocol not in _PORT_PROTOCOLS and (src_port or dst_port):
        raise InputError(f"bad 5-tuple {text!r}: protocol {proto_text} has no ports")
    return FiveTuple(src_ip, src_port, dst_ip, dst_port, protocol)


@dataclass(frozen=True)
class FlowSelector:
    """What the user asked for: one flow id, a community id, or a 5-tuple (both directions)."""

    flow_id: int | None = None
    community_id: str | None = None
    five_tuple: FiveTuple | None = None

    @classmethod
    def parse(cls, flow: str | None, five_tuple: str | None) -> FlowSelector:
        """FLOW and/or --5tuple. Both: the flow (or community) id among the flows of that 5-tuple,
        which lets the flow pass skip every other packet (what `inspect_command` writes)."""
        tuple_ = parse_five_tuple(five_tuple) if five_tuple else None
        if not flow:
            if tuple_ is None:
                raise InputError("missing FLOW: a flow_id or community_id from `iotscan analyze`, or --5tuple "
                                 "SRC:PORT-DST:PORT/PROTO")
            return cls(five_tuple=tuple_)
        text = flow.strip()
        if text.isdigit():
            value = int(text)
            if value >= 1 << 63:
                raise InputError(f"bad flow id {text}: flow ids are 63-bit numbers")
            return cls(flow_id=value, five_tuple=tuple_)
        if re.fullmatch(r"1:[A-Za-z0-9+/]{27}=", text):
            return cls(community_id=text, five_tuple=tuple_)
        if "/" in text and "-" in text:
            if tuple_ is not None:
                raise InputError("give the 5-tuple once: as FLOW or as --5tuple")
            return cls(five_tuple=parse_five_tuple(text))
        raise InputError(f"bad FLOW {text!r}: expected a flow_id (digits), a community_id (1:...=) or a 5-tuple "
                         "SRC:PORT-DST:PORT/PROTO")

    @property
    def unique(self) -> bool:
        """A flow id names one flow; a community id or 5-tuple may name several (one per idle period)."""
        return self.flow_id is not None

    def describe(self) -> str:
        among = f" among the flows of {self.five_tuple}" if self.five_tuple is not None else ""
        if self.flow_id is not None:
            return f"id {self.flow_id}{among}"
        if self.community_id is not None:
            return f"community id {self.community_id}{among}"
        return f"5-tuple {self.five_tuple}"

    def matches(self, record: dict[str, Any]) -> bool:
        if self.five_tuple is not None and not self.five_tuple.matches(record):
            return False
        if self.flow_id is not None:
            return record["flow_id"] == self.flow_id
        if self.community_id is not None:
            return record["community_id"] == self.community_id
        return True


@dataclass
class FoundFlow:
    """A flow record and the earliest time its packets can have (see flow_filter)."""

    record: dict[str, Any]
    not_before_ms: int


def _meter_key(flow: Any) -> tuple:
    ends = sorted([(flow.src_ip, flow.src_port), (flow.dst_ip, flow.dst_port)])
    return flow.protocol, flow.vlan_id, getattr(flow, "tunnel_id", 0), *ends


@dataclass
class FlowLookup:
    """The flows found, and whether the flow pass saw every packet of the capture (see flows_filter)."""

    flows: list[FoundFlow]
    saw_every_packet: bool


def find_flows(capture: str, selector: FlowSelector, config: MeterConfig, stop_after: int = 0) -> FlowLookup:
    """Meter the capture and return the flows the selector matches, in time order.

    Same meter, same record builder and same timeouts as ``analyze``, hence the same flow ids.
    The meter stops at the first match for a flow id, after ``stop_after`` matches otherwise. With
    a 5-tuple, a BPF filter keeps every other packet out of the meter; if nothing matches (the
    5-tuple was tunnelled, say), the capture is metered again without it.
    """
    if selector.five_tuple is not None and not config.bpf:
        for bpf in bpf_forms(five_tuple_bpf(selector.five_tuple)):
            try:
                found = _find_flows(capture, selector, replace(config, bpf=bpf), stop_after)
            except InputError:  # "vlan" rejected (Linux cooked, raw IP...): the plain filter, else no filter
                continue
            if found:
                return FlowLookup(found, saw_every_packet=False)
            break
    return FlowLookup(_find_flows(capture, selector, config, stop_after), saw_every_packet=not config.bpf)


def _find_flows(capture: str, selector: FlowSelector, config: MeterConfig, stop_after: int) -> list[FoundFlow]:
    base = os.path.basename(capture)
    source = FlowSource(config)
    flows = iter(source)
    found: list[FoundFlow] = []
    wanted_cid = selector.community_id
    if selector.five_tuple is not None:
        t = selector.five_tuple
        wanted_cid = community_id(t.src_ip, t.dst_ip, t.protocol, t.src_port, t.dst_port)
    idle_ms = config.idle_timeout * 1000
    cut_by_active: dict[tuple, int] = {}  # key -> last_seen_ms of a flow cut by the active timeout
    try:
        for flow in flows:
            key = _meter_key(flow)
            predecessor_last = cut_by_active.pop(key, None) if cut_by_active else None
            if flow.expiration_id == 1:  # its successor (same key) starts right after it
                cut_by_active[key] = flow.bidirectional_last_seen_ms
            # Cheap pre-check: one hash instead of a whole record per flow.
            if wanted_cid is not None and flow.protocol not in (1, 58) and wanted_cid != community_id(
                    flow.src_ip, flow.dst_ip, flow.protocol, flow.src_port, flow.dst_port):
                continue
            record = flow_record(flow, capture, base)
            if not selector.matches(record):
                continue
            first = record["first_seen_ms"]
            # A flow of the same key before this one ended at least idle_timeout earlier, or, cut by
            # the active timeout, just before it.
            not_before = predecessor_last + 1 if predecessor_last is not None else first - idle_ms + 1
            found.append(FoundFlow(record, min(not_before, first)))
            if selector.unique or (stop_after and len(found) >= stop_after):
                break
    finally:
        if source.pid is not None and found and (selector.unique or stop_after):
            # Found early: the rest of the capture is of no interest; don't let the meter flush it.
            with contextlib.suppress(OSError):
                os.kill(source.pid, signal.SIGKILL)
        close = getattr(flows, "close", None)
        if close is not None:
            close()
    found.sort(key=lambda f: (f.record["first_seen_ms"], f.record["flow_id"]))
    return found


# -- the display filter ---------------------------------------------------------------------------


def _iso_ms(ms: int) -> str:
    secs, frac = divmod(ms, 1000)
    return dt.datetime.fromtimestamp(secs, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:03d}Z"


def _epoch_ms(ms: int) -> str:
    secs, frac = divmod(ms, 1000)
    return f"{secs}.{frac:03d}"


# ICMP errors quote the headers of the packet they are about, which the 5-tuple filter would match;
# they belong to an ICMP flow. (Written without sets: tshark 3.x and 4.x separate set items differently.)
_ICMP_ERRORS = " || ".join([*(f"icmp.type=={t}" for t in (3, 4, 5, 11, 12)), "(icmpv6.type>=1 && icmpv6.type<=4)"])


def flow_filter(flow: FoundFlow, time_syntax: str = "iso", any_time: bool = False) -> str:
    """The tshark display filter of one flow: both directions of its 5-tuple, its VLAN, and its
    time window, so that flows of the same 5-tuple at other times (or VLANs) are left out.

    The window ends with the flow's last packet (NFStream truncates to the millisecond, and its
    times never run ahead of the capture's: it holds time still when a capture's timestamps step
    back). It starts at ``not_before_ms``, not at the first packet: a packet whose timestamp
    stepped back belongs to the flow although it is older than ``first_seen_ms``, and the flow
    before of the same key ended at least the idle timeout earlier (or, cut by the active timeout,
    right before; find_flows knows which).

    ``time_syntax``: "iso" (frame.time with UTC ISO 8601 text, tshark >= 4.0) or "epoch"
    (frame.time_epoch in seconds, tshark < 4.2). ``any_time`` leaves the window out.
    """
    record = flow.record
    a, b = record["src_ip"], record["dst_ip"]
    pa, pb = record["src_port"], record["dst_port"]
    proto = record["protocol"]
    ipf = "ipv6" if record.get("ip_version") == 6 or ":" in a else "ip"
    transport = _PORT_PROTOCOLS.get(proto)
    if transport:
        fwd = f"{ipf}.src=={a} && {ipf}.dst=={b} && {transport}.srcport=={pa} && {transport}.dstport=={pb}"
        rev = f"{ipf}.src=={b} && {ipf}.dst=={a} && {transport}.srcport=={pb} && {transport}.dstport=={pa}"
        what = f"(({fwd}) || ({rev})) && !({_ICMP_ERRORS})"
    else:
        pair = f"(({ipf}.src=={a} && {ipf}.dst=={b}) || ({ipf}.src=={b} && {ipf}.dst=={a}))"
        if proto == 1:
            what = f"{pair} && icmp"
        elif proto == 58:
            what = f"{pair} && icmpv6"
        else:
            what = f"{pair} && {'ipv6.nxt' if ipf == 'ipv6' else 'ip.proto'}=={proto}"
    if record.get("vlan_id"):
        what += f" && vlan.id=={record['vlan_id']}"
    if any_time:
        return what
    end = record["last_seen_ms"] + 1
    return f"{what} && {_time_at_least(flow.not_before_ms, time_syntax)} && {_time_at_least(end, time_syntax, '<')}"


def _time_at_least(ms: int, time_syntax: str, op: str = ">=") -> str:
    return f'frame.time {op} "{_iso_ms(ms)}"' if time_syntax == "iso" else f"frame.time_epoch {op} {_epoch_ms(ms)}"


# When the flow pass saw only the 5-tuple's packets, its clock did not see the others: the first IP
# packet after the flows' end proves them complete only if the capture's time does not step back
# by more than this.
MARKER_SLACK_MS = 60_000


def flows_filter(flows: list[FoundFlow], time_syntax: str = "iso", any_time: bool = False,
                 marker_after_ms: int | None = None, marker: bool = True) -> str:
    """The display filter of the flows' packets, plus, unless ``any_time`` or not ``marker``, every IP packet from
    ``marker_after_ms`` (default: the flows' end): once tshark shows that one, no packet of the flows
    can follow, and the caller stops tshark instead of letting it dissect the rest of the capture.

    Why: NFStream's clock never steps back (a packet older than the newest one seen counts as of
    that time), so every packet a full flow pass put in the flows was read before any IP packet
    stamped later than their end.
    """
    parts = list(dict.fromkeys(flow_filter(f, time_syntax, any_time) for f in flows))
    packets = parts[0] if len(parts) == 1 else " || ".join(f"({p})" for p in parts)
    if any_time or not marker:
        return packets
    after = flows_end_ms(flows) if marker_after_ms is None else marker_after_ms
    return f"({packets}) || ((ip || ipv6) && {_time_at_least(after, time_syntax)})"


def flows_end_ms(flows: list[FoundFlow]) -> int:
    """The first millisecond after the flows' last packet."""
    return max(f.record["last_seen_ms"] for f in flows) + 1


# -- tshark ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    """The Wireshark programs inspect runs: tshark, and editcap (same package) to cut the flow's frames out."""

    tshark: str
    editcap: str


def find_tshark() -> Tools:
    """tshark ($IOTSCAN_TSHARK if set, else the first on PATH) and the editcap beside it or on PATH;
    CaptureError (exit 3) when either is missing."""
    explicit = os.environ.get(TSHARK_ENV)
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise CaptureError(f"tshark not found: {TSHARK_ENV}={explicit} is not an executable file; "
                               f"`iotscan inspect` reads packets through tshark: {INSTALL_HINT}")
        tshark = explicit
    else:
        found = shutil.which("tshark")
        if found is None:
            raise CaptureError(f"tshark is not installed (not on PATH): `iotscan inspect` reads packets through "
                               f"tshark; {INSTALL_HINT}")
        tshark = found
    editcap = shutil.which("editcap", path=os.path.dirname(tshark)) or shutil.which("editcap")
    if editcap is None:
        raise CaptureError(f"editcap (a Wireshark tool, installed with tshark) is not on PATH: {INSTALL_HINT}")
    return Tools(tshark, editcap)


def _load_pdml_parser() -> Any:
    try:
        from pyshark.tshark.output_parser.tshark_xml import packet_from_xml_packet
    except ImportError as exc:
        raise CaptureError(f"pyshark is not importable ({exc}): reinstall iotscan (pip install iotscan)") from exc
    return packet_from_xml_packet


_FILTER_TIME_ERROR = re.compile(r"frame\.time|time offset|absolute time|not a valid", re.I)
_TRUNCATED = ("cut short in the middle of a packet", "appears to be damaged or corrupt")
_UNREADABLE = ("isn't a capture file in a format", "unknown file type", "doesn't support", "isn't supported",
               "is a named pipe", "is a directory")


class _Child:
    """A tshark or editcap child: stdout read in chunks, stderr kept in a temporary file.

    Always reaped: ``close()`` terminates it and kills it if it does not go within two seconds, or
    at once when interrupted while waiting (a second Ctrl-C). Its own session: a terminal's Ctrl-C
    reaches iotscan, which then ends it.
    """

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.name = os.path.basename(argv[0])
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the child; closed in close()
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True)
        except OSError as exc:
            self.stderr.close()
            raise CaptureError(f"cannot run {self.name} ({argv[0]}): {exc.strerror or exc}; {INSTALL_HINT}") from exc

    def chunks(self) -> Iterator[bytes]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, _READ_CHUNK):
            yield chunk

    def lines(self) -> Iterator[bytes]:
        rest = b""
        for chunk in self.chunks():
            rest += chunk
            *complete, rest = rest.split(b"\n")
            yield from complete
        if rest:
            yield rest

    def finish(self) -> tuple[int, str]:
        """Wait for the exit after the end of output: (exit code, the last lines of stderr)."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            raise CaptureError(f"{self.name} closed its output but did not exit within {_EXIT_WAIT_S:.0f} s") from None
        self.stderr.seek(0)
        text = self.stderr.read()[-8192:].decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()
                 and "This could be dangerous" not in line and not line.strip().startswith("^")]
        return code, " ".join(lines[-3:]).removeprefix(f"{self.name}: ")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=_KILL_WAIT_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=_KILL_WAIT_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
            finally:
                if proc.poll() is None:  # interrupted while waiting: no mercy
                    with contextlib.suppress(OSError):
                        proc.kill()
                if proc.stdout is not None:
                    proc.stdout.close()
        self.stderr.close()


def _check(capture: str, child: _Child, outputs: int) -> str | None:
    """After a child's output ended: None if it went well, a warning if the capture ends in damage (the output
    before the damage is good), "rejected" if tshark refused the ISO 8601 time filter; raises otherwise."""
    code, message = child.finish()
    if code == 0:
        return None
    if code < 0:
        raise CaptureError(f"{capture}: {child.name} was killed by signal {-code}")
    lowered = message.lower()
    if any(s in lowered for s in _TRUNCATED):
        return f"{child.name} stopped at damage in the capture: {message}"
    if any(s in lowered for s in _UNREADABLE):
        raise InputError(f"{capture}: {child.name} cannot read this capture: {message}")
    if outputs == 0 and child.name.startswith("tshark") and _FILTER_TIME_ERROR.search(message):
        return "rejected"
    raise CaptureError(f"{capture}: {child.name} failed: {message or f'exit code {code}'}")


@dataclass
class ReadStats:
    """What the tshark passes did, for warnings and the summary record."""

    display_filter: str = ""
    packets: int = 0  # packet records produced
    expected: int = 0  # packets the flow records count
    limited: bool = False  # --limit reached
    warnings: list[str] = field(default_factory=list)


def select_frames(tools: Tools, capture: str, lookup: FlowLookup, stats: ReadStats, *, limit: int = 0,
                  any_time: bool = False) -> list[int]:
    """The frame numbers of the flows' packets, from tshark reading the capture with their display filter.

    tshark prints a summary line of two columns (frame number, epoch time) per matching packet, so it
    dissects as cheaply as a plain ``tshark -Y`` does: PDML or ``-T fields`` output make it build the
    full protocol tree of every packet of the capture, which costs twice as much.
    Ends tshark after ``limit`` frames, or when it has read past the flows' end (see flows_filter).
    """
    flows = lookup.flows
    end_ms = flows_end_ms(flows) + (0 if lookup.saw_every_packet else MARKER_SLACK_MS)
    frames: list[int] = []
    for syntax in ("iso", "epoch"):
        stats.display_filter = flows_filter(flows, syntax, any_time, marker_after_ms=end_ms)
        child = _Child([tools.tshark, "-n", "-l", "-r", capture, "-Y", stats.display_filter, *_NUMBER_AND_TIME])
        try:
            complete = True
            for line in child.lines():
                number, _, when = line.strip().partition(b" ")
                if not any_time and _timestamp_ms(when.strip().decode()) >= end_ms:
                    break  # the marker packet: the flows are complete
                frames.append(int(number))
                if limit and len(frames) >= limit:
                    stats.limited = True
                    break
            else:
                outcome = _check(capture, child, len(frames))
                complete = outcome != "rejected"
                if outcome and complete:
                    stats.warnings.append(outcome)
        finally:
            child.close()
        if complete:
            return frames
    raise CaptureError(f"{capture}: tshark rejected the display filter {stats.display_filter!r}")


_NUMBER_AND_TIME = ("-t", "e", "-o", 'gui.column.format:"No.","%m","Time","%t"')  # summary columns
_EDITCAP_RANGES = 20_000  # frame ranges per editcap call: keeps the command line short


def dissect_frames(tools: Tools, capture: str, frames: list[int]) -> Iterator[tuple[Any, list[int]]]:
    """Each frame as a pyshark Packet, in order: editcap cuts the frames out of the capture into a temporary
    file (no dissection: fast) and tshark dissects only them into PDML for pyshark. With each Packet, the
    capture's frame numbers of the extract it comes from (the Packet's frame numbers count in the extract)."""
    parse = _load_pdml_parser()
    with tempfile.TemporaryDirectory(prefix="iotscan-inspect-") as tmp:
        ranges = _ranges(frames)
        for start in range(0, len(ranges), _EDITCAP_RANGES):
            batch = ranges[start:start + _EDITCAP_RANGES]
            numbers = [n for first, last in batch for n in range(first, last + 1)]
            part = os.path.join(tmp, "flow")  # editcap writes the capture's own format
            editcap = _Child([tools.editcap, "-r", capture, part,
                              *(str(a) if a == b else f"{a}-{b}" for a, b in batch)])
            try:
                for _ in editcap.chunks():
                    pass
                _check(capture, editcap, 0)  # a capture damaged further on: the frames before it are written
            finally:
                editcap.close()
            for packet in _pdml_packets(tools, capture, part, parse):
                yield packet, numbers


def _pdml_packets(tools: Tools, capture: str, part: str, parse: Any) -> Iterator[Any]:
    child = _Child([tools.tshark, "-n", "-l", "-r", part, "-T", "pdml"])
    buf = b""
    scanned = 0  # buf[:scanned] holds no end tag: don't search it again
    start_tag, end_tag = b"<packet>", b"</packet>"
    count = 0
    try:
        for chunk in child.chunks():
            buf += chunk
            while (end := buf.find(end_tag, scanned)) >= 0:
                stop = end + len(end_tag)
                xml, buf, scanned = buf[buf.find(start_tag):stop], buf[stop:], 0
                count += 1
                yield parse(xml)
            scanned = max(len(buf) - len(end_tag), 0)
        warning = _check(capture, child, count)
        if warning and warning != "rejected":
            raise CaptureError(f"{capture}: tshark could not dissect the flow's packets: {warning}")
    finally:
        child.close()


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    """Sorted frame numbers as (first, last) runs."""
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs


def read_flow_packets(tools: Tools, capture: str, lookup: FlowLookup, stats: ReadStats, *, limit: int = 0,
                      payload: bool = False, any_time: bool = False) -> Iterator[dict[str, Any]]:
    """Packet records of the flows, in capture order: tshark selects their frames (select_frames), then
    dissects only those (dissect_frames)."""
    flows = lookup.flows
    stats.expected = sum(f.record["packets"] for f in flows)
    records = [f.record for f in flows]
    frames = select_frames(tools, capture, lookup, stats, limit=limit, any_time=any_time)
    for packet, numbers in dissect_frames(tools, capture, frames):
        record = packet_record(packet, _owner(packet, records), payload=payload, frame_numbers=numbers)
        stats.packets += 1
        yield record
    if stats.packets != len(frames):
        stats.warnings.append(f"tshark dissected {stats.packets:,} of the {len(frames):,} frames it selected")
    if not stats.limited and stats.packets != stats.expected and not (any_time and stats.packets > stats.expected):
        stats.warnings.append(
            f"tshark matched {stats.packets:,} packets, the flow record{'s' if len(flows) > 1 else ''} count "
            f"{stats.expected:,}: the capture's timestamps may step back (NFStream then counts a packet at the newest "
            "time seen), packets may be duplicated, or IP fragments were reassembled"
            + ("; --any-time drops the time window" if stats.packets < stats.expected and not any_time else ""))


def _owner(packet: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The flow a packet belongs to, when one filter covers several flows of one 5-tuple."""
    if len(records) == 1:
        return records[0]
    ms = _timestamp_ms(packet.sniff_timestamp)
    for r in records:
        if r["first_seen_ms"] <= ms <= r["last_seen_ms"]:
            return r
    # Outside every window (time stepped back): the flow that starts next, else the last one.
    later = [r for r in records if r["first_seen_ms"] > ms]
    return later[0] if later else records[-1]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def inspect_capture(capture: str, selector: FlowSelector, config: MeterConfig, tools: Tools, sink: Any, *,
                    pick: int | None = None, limit: int = 0, payload: bool = False, any_time: bool = False,
                    warn: Any = None) -> bool:
    """The whole of `iotscan inspect` but option parsing: find the flows, write each flow record before
    its packets, then the summary. Returns False when interrupted (Ctrl-C, or SIGTERM raised as one).

    ``capture`` is the capture as the user named it (flow ids and messages use it); the file read is
    ``config.source`` (the same, or a decompressed copy). ``pick``: of several matching flows, the N-th
    (1-based); ``warn``: called with each warning for a person (the summary carries them too).
    """
    started = time.monotonic()
    try:
        lookup = find_flows(capture, selector, config, stop_after=pick or 0)
    except KeyboardInterrupt:
        message = "interrupted by the user while looking for the flow"
        if warn is not None:
            warn(message)
        sink.close(summary_record(packets=0, flows=0, elapsed_s=round(time.monotonic() - started, 3), errors=[],
                                  warnings=[{"source": capture, "code": "interrupted", "message": message}],
                                  inputs=[{"source": capture, "packets": 0, "flows": 0, "status": "interrupted"}]))
        return False
    found = lookup.flows
    if not found:
        hint = " (flow ids depend on the capture's file name and on analyze's --idle-timeout and --active-timeout)" \
            if selector.flow_id is not None else ""
        raise InputError(f"no flow with {selector.describe()} in {capture}{hint}")
    warnings: list[dict[str, str]] = []
    if pick is not None:
        if pick > len(found):
            matches = _plural(len(found), "flow")
            raise InputError(f"{selector.describe()} matches {matches} in {capture}: --index {pick} is out of range")
        found = lookup.flows = [found[pick - 1]]
    elif len(found) > 1:
        warnings.append({"source": capture, "code": "several_flows", "message": (
            f"{selector.describe()} matches {len(found)} flows in {capture} (the same 5-tuple at different times): "
            "showing all of them; --index N or --first picks one")})
    stats = ReadStats()
    interrupted = False
    packets = read_flow_packets(tools, config.source, lookup, stats, limit=limit, payload=payload,
                                any_time=any_time)
    try:
        shown: set[int] = set()
        for packet in packets:
            if packet["flow_id"] not in shown:
                shown.add(packet["flow_id"])
                sink.write(next(f.record for f in found if f.record["flow_id"] == packet["flow_id"]))
            sink.write(packet)
        for f in found:  # a flow tshark found no packet of still gets its record
            if f.record["flow_id"] not in shown:
                sink.write(f.record)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        packets.close()  # ends tshark now, whatever happened
        warnings += [{"source": capture, "code": "packets", "message": m} for m in stats.warnings]
        if interrupted:
            warnings.append({"source": capture, "code": "interrupted",
                             "message": "interrupted by the user: packets are partial"})
        if warn is not None:
            for w in warnings:
                warn(w["message"])
        elapsed = time.monotonic() - started
        sink.close(summary_record(
            packets=stats.packets, flows=len(found), elapsed_s=round(elapsed, 3),
            packets_per_s=round(stats.packets / elapsed, 1) if elapsed else 0.0, warnings=warnings, errors=[],
            inputs=[{"source": capture, "packets": stats.packets, "flows": len(found),
                     "status": "interrupted" if interrupted else "ok"}],
            display_filter=stats.display_filter, limited=stats.limited))
    return not interrupted


# -- packet records -------------------------------------------------------------------------------


def _timestamp_ms(raw: str) -> int:
    secs, _, frac = str(raw).partition(".")
    return int(secs) * 1000 + int((frac + "000")[:3])


class _Fields:
    """A pyshark layer's fields by their full tshark names (pyshark's get_field scans all fields on
    a miss, and most of the names asked for here are absent)."""

    __slots__ = ("by_name", "name")

    def __init__(self, layer: Any) -> None:
        self.name: str = layer.layer_name
        try:
            containers = layer._all_fields  # XmlLayer's own index (pyshark 0.5, 0.6)
        except AttributeError:
            raise CaptureError("this pyshark version keeps packet fields where iotscan does not look: install "
                               "pyshark 0.6 (pip install 'pyshark>=0.6,<0.7')") from None
        self.by_name: dict[str, list[Any]] = {n: c.all_fields for n, c in containers.items()}

    def all(self, name: str) -> list[Any]:
        return self.by_name.get(name, [])

    def first(self, name: str) -> Any | None:
        found = self.by_name.get(name)
        return found[0] if found else None

    def show(self, name: str) -> str | None:
        f = self.first(name)
        if f is None:
            return None
        value = f.show if f.show is not None else f.raw_value
        return value if value != "" else None

    def int(self, name: str) -> int | None:
        value = self.show(name)
        if value is None:
            return None
        try:
            return int(value, 0) if value.lower().startswith("0x") else int(value)
        except ValueError:
            return None

    def flag(self, name: str) -> bool | None:
        value = self.show(name)
        return None if value is None else value in ("1", "True", "true")

    def label(self, name: str) -> str | None:
        """The value part of the showname without the trailing number: 'Type: A (Host Address) (1)' -> 'A (Host
        Address)'."""
        f = self.first(name)
        return _label(f) if f is not None else None

    def text(self, name: str) -> str | None:
        """Bytes fields (raw hex) as text, undecodable bytes escaped."""
        parts = [bytes.fromhex(f.raw_value) for f in self.all(name) if f.raw_value and _is_hex(f.raw_value)]
        if not parts:
            return None
        return b"".join(parts).decode("utf-8", errors="backslashreplace")


def _is_hex(value: str) -> bool:
    return len(value) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in value)


def _label(f: Any) -> str | None:
    showname = f.showname or ""
    value = showname.split(": ", 1)[1] if ": " in showname else showname
    value = re.sub(r"\s*\((?:0x)?[0-9a-fA-F]+\)$", "", value.strip())
    return value or None


# In Wireshark's order: "SYN,ACK", "PSH,ACK", "FIN,ACK".
TCP_FLAG_NAMES = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"),
                  (0x40, "ECE"), (0x80, "CWR"), (0x100, "AE"))
MQTT_TYPES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP",
              8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP",
              14: "DISCONNECT", 15: "AUTH"}
TLS_HANDSHAKE_TYPES = {0: "hello_request", 1: "client_hello", 2: "server_hello", 4: "new_session_ticket",
                       5: "end_of_early_data", 8: "encrypted_extensions", 11: "certificate",
                       12: "server_key_exchange", 13: "certificate_request", 14: "server_hello_done",
                       15: "certificate_verify", 16: "client_key_exchange", 20: "finished", 24: "key_update"}
TLS_VERSIONS = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2", 0x0304: "TLS 1.3",
                0xFEFF: "DTLS 1.0", 0xFEFD: "DTLS 1.2", 0xFEFC: "DTLS 1.3"}
DHCP_MESSAGE_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK", 7: "RELEASE",
                      8: "INFORM"}
COAP_TYPES = {0: "CON", 1: "NON", 2: "ACK", 3: "RST"}
SSDP_HEADERS = ("st", "nt", "nts", "usn", "man", "mx")


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """The first PDU of a protocol in a packet fills its fields; later ones do not overwrite them."""
    if value is not None and value != [] and key not in out:
        out[key] = value


def _ip(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "ttl", f.int("ip.ttl"))


def _ipv6(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "ttl", f.int("ipv6.hlim"))


def _tcp(f: _Fields, out: dict[str, Any]) -> None:
    flags = f.int("tcp.flags")
    if flags is not None:
        _put(out, "tcp_flags", ",".join(name for bit, name in TCP_FLAG_NAMES if flags & bit) or "none")
    _put(out, "tcp_seq", f.int("tcp.seq"))
    _put(out, "tcp_ack", f.int("tcp.ack"))
    _put(out, "tcp_window", f.int("tcp.window_size_value"))
    _put(out, "payload_length", f.int("tcp.len"))


def _udp(f: _Fields, out: dict[str, Any]) -> None:
    length = f.int("udp.length")
    if length is not None:
        _put(out, "payload_length", max(length - 8, 0))


def _icmp(f: _Fields, out: dict[str, Any]) -> None:
    prefix = f.name  # icmp or icmpv6
    _put(out, "icmp_type", f.int(f"{prefix}.type"))
    _put(out, "icmp_code", f.int(f"{prefix}.code"))
    label = f.label(f"{prefix}.type")  # ICMP: "8 (Echo (ping) request)"; ICMPv6: "Neighbor Solicitation"
    m = re.fullmatch(r"\d+ \((.*)\)", label or "")
    _put(out, "icmp_label", m.group(1) if m else label)


def _dns(f: _Fields, out: dict[str, Any]) -> None:
    # mDNS and LLMNR layers carry the same dns.* fields.
    _put(out, "dns_id", f.int("dns.id"))
    _put(out, "dns_response", f.flag("dns.flags.response"))
    _put(out, "dns_query", f.show("dns.qry.name"))
    qtype = f.label("dns.qry.type")
    _put(out, "dns_qtype", qtype.split()[0] if qtype else None)
    if f.flag("dns.flags.response"):
        _put(out, "dns_rcode", f.int("dns.flags.rcode"))
        _put(out, "dns_answers", _dns_answers(f))


# Fields of a resource record's header: everything after them in the record is its data.
_DNS_RR_HEADER = {"dns.resp.name", "dns.resp.type", "dns.resp.class", "dns.resp.ttl", "dns.resp.len",
                  "dns.resp.cache_flush", "dns.resp.ext_rcode", "dns.resp.edns0_version", "dns.resp.z",
                  "dns.resp.z.do", "dns.resp.z.reserved", "dns.rr.udp_payload_size"}


def _dns_answers(f: _Fields) -> list[dict[str, Any]]:
    """The answer section as [{name, type, ttl, data}], data as dig shows it (fields joined by spaces)."""
    count = f.int("dns.count.answers") or 0
    names, types, ttls = f.all("dns.resp.name"), f.all("dns.resp.type"), f.all("dns.resp.ttl")
    lengths = f.all("dns.resp.len")
    answers: list[dict[str, Any]] = []
    for i in range(min(count, len(names), len(types), len(lengths))):
        start = int(lengths[i].pos) + int(lengths[i].size)
        end = start + int(lengths[i].show or 0)
        data = [fld for name, flds in f.by_name.items() if name.startswith("dns.") and name not in _DNS_RR_HEADER
                and not name.endswith((".len", ".length")) for fld in flds
                if fld.pos is not None and start <= int(fld.pos) < end and fld.show]
        data.sort(key=lambda fld: int(fld.pos))
        rtype = _label(types[i]) or types[i].show
        answers.append({"name": names[i].show, "type": rtype.split()[0] if rtype else None,
                        "ttl": int(ttls[i].show) if i < len(ttls) and ttls[i].show else None,
                        "data": " ".join(fld.show for fld in data) or None})
    return answers


def _http(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "http_method", f.show("http.request.method"))
    _put(out, "http_host", f.show("http.host"))
    _put(out, "http_uri", f.show("http.request.uri"))
    _put(out, "http_user_agent", f.show("http.user_agent"))
    _put(out, "http_status", f.int("http.response.code"))
    _put(out, "http_reason", f.show("http.response.phrase"))
    _put(out, "http_content_type", f.show("http.content_type"))
    _put(out, "http_server", f.show("http.server"))
    _put(out, "http_location", f.show("http.location"))


def _ssdp(f: _Fields, out: dict[str, Any]) -> None:
    _http(f, out)
    for fld in f.all("http.unknown_header"):
        name, sep, value = (fld.show or "").partition(":")
        key = name.strip().lower()
        if sep and key in SSDP_HEADERS:
            _put(out, f"ssdp_{key}", value.strip().removesuffix("\\r\\n").strip())


def _tls(f: _Fields, out: dict[str, Any]) -> None:
    types = [TLS_HANDSHAKE_TYPES.get(int(x.show), x.show) for x in f.all(f"{f.name}.handshake.type")
             if x.show and x.show.isdigit()]
    if types:
        out.setdefault("tls_handshake_types", []).extend(types)
    _put(out, "tls_sni", f.show(f"{f.name}.handshake.extensions_server_name"))
    versions = [int(x.show, 16) for x in f.all(f"{f.name}.handshake.extensions.supported_version")
                if x.show and x.show.startswith("0x")]
    hello_version = f.int(f"{f.name}.handshake.version")
    if versions:
        # A client offers several (the best first after GREASE), a server hello names the chosen one.
        real = [v for v in versions if v in TLS_VERSIONS]
        _put(out, "tls_version", TLS_VERSIONS.get(max(real)) if real else None)
    elif hello_version is not None:
        _put(out, "tls_version", TLS_VERSIONS.get(hello_version, hex(hello_version)))
    record_version = f.int(f"{f.name}.record.version")
    if record_version is not None:
        _put(out, "tls_record_version", TLS_VERSIONS.get(record_version, hex(record_version)))
    _put(out, "tls_alpn", [x.show for x in f.all(f"{f.name}.handshake.extensions_alpn_str") if x.show])
    if "server_hello" in types:
        _put(out, "tls_cipher_suite", f.label(f"{f.name}.handshake.ciphersuite"))
    _put(out, "tls_ja3", f.show(f"{f.name}.handshake.ja3"))
    _put(out, "tls_ja3s", f.show(f"{f.name}.handshake.ja3s"))


def _mqtt(f: _Fields, out: dict[str, Any]) -> None:
    msgtype = f.int("mqtt.msgtype")
    if msgtype is None:
        return
    _put(out, "mqtt_msgtype", MQTT_TYPES.get(msgtype, str(msgtype)))
    _put(out, "mqtt_topic", f.show("mqtt.topic"))
    _put(out, "mqtt_qos", f.int("mqtt.qos"))
    _put(out, "mqtt_client_id", f.show("mqtt.clientid"))
    _put(out, "mqtt_username", f.show("mqtt.username"))
    _put(out, "mqtt_message", f.text("mqtt.msg"))


def _dhcp(f: _Fields, out: dict[str, Any]) -> None:
    p = f.name  # "dhcp" (tshark >= 3.0) or "bootp"
    kind = f.int(f"{p}.option.dhcp")
    _put(out, "dhcp_msgtype", DHCP_MESSAGE_TYPES.get(kind, str(kind)) if kind is not None else None)
    _put(out, "dhcp_client_mac", f.show(f"{p}.hw.mac_addr"))
    _put(out, "dhcp_hostname", f.show(f"{p}.option.hostname"))
    _put(out, "dhcp_vendor_class", f.show(f"{p}.option.vendor_class_id"))
    _put(out, "dhcp_param_list", [int(x.show) for x in f.all(f"{p}.option.request_list_item")
                                  if x.show and x.show.isdigit()])
    _put(out, "dhcp_requested_ip", f.show(f"{p}.option.requested_ip_address"))
    your = f.show(f"{p}.ip.your")
    _put(out, "dhcp_your_ip", your if your and your != "0.0.0.0" else None)


def _telnet(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "telnet_data", f.text("telnet.data"))


def _coap(f: _Fields, out: dict[str, Any]) -> None:
    kind = f.int("coap.type")
    _put(out, "coap_type", COAP_TYPES.get(kind) if kind is not None else None)
    _put(out, "coap_code", f.label("coap.code"))
    _put(out, "coap_mid", f.int("coap.mid"))
    _put(out, "coap_uri", f.show("coap.opt.uri_path_recon"))


def _irc(f: _Fields, out: dict[str, Any]) -> None:
    lines = [x.show for name in ("irc.request", "irc.response") for x in f.all(name) if x.show]
    if lines:
        out.setdefault("irc_lines", []).extend(lines)


def _ftp(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "ftp_command", f.show("ftp.request.command"))
    _put(out, "ftp_arg", f.show("ftp.request.arg"))
    _put(out, "ftp_response_code", f.int("ftp.response.code"))
    _put(out, "ftp_response_arg", f.show("ftp.response.arg"))


def _reassembly(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "reassembled_frames", [int(x.show) for x in f.all("tcp.segment") if x.show and x.show.isdigit()])


def _tftp(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "tftp_opcode", f.label("tftp.opcode"))
    _put(out, "tftp_file", f.show("tftp.source_file") or f.show("tftp.destination_file"))


# pyshark's name for tshark's "fake-field-wrapper": the reassembly facts of a TCP PDU, not a protocol.
_REASSEMBLY = "DATA"

LAYER_FIELDS = {
    "ip": _ip, "ipv6": _ipv6, "tcp": _tcp, "udp": _udp, "icmp": _icmp, "icmpv6": _icmp,
    "dns": _dns, "mdns": _dns, "llmnr": _dns, "http": _http, "ssdp": _ssdp, "tls": _tls, "dtls": _tls,
    "mqtt": _mqtt, "dhcp": _dhcp, "bootp": _dhcp, "telnet": _telnet, "coap": _coap, "irc": _irc, "ftp": _ftp,
    "tftp": _tftp, _REASSEMBLY: _reassembly,
}

# The frame facts every packet record has (README, "inspect"); the layers' fields follow them.
PACKET_FIELDS: tuple[tuple[str, str], ...] = (
    ("timestamp", "capture time, ISO 8601 UTC to the microsecond (as flow records, to the millisecond)"),
    ("event_type", "always \"packet\""),
    ("flow_id", "the flow the packet belongs to (as in analyze's flow records)"),
    ("community_id", "the flow's Community ID"),
    ("source", "capture file"),
    ("frame_number", "Wireshark's frame number in the capture (Go to packet)"),
    ("timestamp_ms", "capture time, epoch milliseconds (as first_seen_ms of flow records)"),
    ("direction", "src2dst (from the flow's initiator) or dst2src"),
    ("length", "bytes on the wire"),
    ("captured_length", "bytes captured"),
    ("layers", "tshark's protocol layers, outermost first, e.g. [eth, ip, udp, dns]"),
    ("reassembled_frames", "frames whose TCP payloads tshark joined into the PDU dissected here"),
)


def packet_record(packet: Any, flow: dict[str, Any], payload: bool = False,
                  frame_numbers: list[int] | None = None) -> dict[str, Any]:
    """The flat record of one pyshark Packet of a flow: frame facts, then each dissected layer's fields.
    ``frame_numbers``: when tshark read an extract of the capture, the capture's number of each of its frames."""
    renumber = (lambda n: frame_numbers[n - 1]) if frame_numbers is not None else (lambda n: n)
    raw_ts = str(packet.sniff_timestamp)
    layers = [layer.layer_name for layer in packet.layers if layer.layer_name != _REASSEMBLY]
    record: dict[str, Any] = {
        "timestamp": iso_timestamp_text(raw_ts),
        "event_type": "packet",
        "flow_id": flow["flow_id"],
        "community_id": flow["community_id"],
        "source": flow["source"],
        "frame_number": renumber(int(packet.number)),
        "timestamp_ms": _timestamp_ms(raw_ts),
        "direction": None,
        "length": int(packet.length),
        "captured_length": int(packet.captured_length),
        "layers": layers,
    }
    fields = [_Fields(layer) for layer in packet.layers]
    record["direction"] = _direction(fields, flow)
    expert: list[str] = []
    for f in fields:
        extract = LAYER_FIELDS.get(f.name)
        if extract is not None:
            extract(f, record)
        expert.extend(_expert_messages(f))
    if expert:
        record["expert"] = expert
    if "reassembled_frames" in record:
        record["reassembled_frames"] = [renumber(n) for n in record["reassembled_frames"]]
    if payload:
        record["payload_hex"] = _payload_hex(fields)
    return record


def _expert_messages(f: _Fields) -> list[str]:
    """tshark's warnings and errors about the packet (malformed, previous segment not captured...); notes and
    chats (retransmissions, connection setup) are left out."""
    messages = []
    for expert, severity in zip(f.all("_ws.expert.message"), f.all("_ws.expert.severity"), strict=False):
        level = _label(severity) or ""
        if level in ("Warning", "Error") and expert.show:
            messages.append(f"{level.lower()}: {expert.show}")
    return list(dict.fromkeys(messages))


def _direction(fields: list[_Fields], flow: dict[str, Any]) -> str | None:
    """src2dst when the packet goes from the flow's initiator; the innermost IP header decides (tunnels)."""
    src, dst = flow["src_ip"], flow["dst_ip"]
    src_port, dst_port = flow["src_port"], flow["dst_port"]
    ips = [f for f in fields if f.name in ("ip", "ipv6")]
    ports = [f for f in fields if f.name in ("tcp", "udp", "sctp")]
    for ip in reversed(ips):
        a, b = ip.show(f"{ip.name}.src"), ip.show(f"{ip.name}.dst")
        if a is None or b is None:
            continue
        a, b = _norm_ip(a), _norm_ip(b)
        if (a, b) == (src, dst) and (a, b) != (dst, src):
            return "src2dst"
        if (a, b) == (dst, src) and (a, b) != (src, dst):
            return "dst2src"
        if a == b == src == dst:  # the same host on both ends: the ports decide
            if not ports or src_port == dst_port:
                return "src2dst"  # nothing tells the ends apart; NFStream counts every packet this way
            sp = ports[-1].int(f"{ports[-1].name}.srcport")
            dp = ports[-1].int(f"{ports[-1].name}.dstport")
            if (sp, dp) == (src_port, dst_port):
                return "src2dst"
            if (sp, dp) == (dst_port, src_port):
                return "dst2src"
    return None


def _norm_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _payload_hex(fields: list[_Fields]) -> str:
    """The transport payload (what follows the TCP/UDP header; the data of other protocols) as hex; "" if none."""
    for name in ("tcp.payload", "udp.payload", "data.data"):
        for f in reversed(fields):
            found = f.first(name)
            if found is not None and found.raw_value and _is_hex(found.raw_value):
                return found.raw_value.lower()
    return ""


# -- for analyze --explain ------------------------------------------------------------------------


def record_five_tuple(record: dict[str, Any]) -> str:
    """A flow record's 5-tuple as --5tuple takes it."""
    return str(FiveTuple(record["src_ip"], record["src_port"], record["dst_ip"], record["dst_port"],
                         record["protocol"]))


def inspect_command(record: dict[str, Any], *, idle_timeout: int = 120, active_timeout: int = 1800,
                    program: str = "iotscan") -> str:
    """The ready-to-run, shell-quoted command that shows the packets of a flow record of a capture file.

    It names the flow by its id and gives its 5-tuple too, so that on a large capture the flow pass
    meters only that 5-tuple's packets. Flow ids depend on the meter's timeouts: pass the ones
    analyze ran with when they are not the defaults, and the command carries them. (A record of
    `iotscan live` names an interface, which has no packets to show afterwards.)
    """
    argv = [program, "inspect", str(record["source"]), str(record["flow_id"]), "--5tuple", record_five_tuple(record)]
    if idle_timeout != 120:
        argv += ["--idle-timeout", str(idle_timeout)]
    if active_timeout != 1800:
        argv += ["--active-timeout", str(active_timeout)]
    return shlex.join(argv)


class InspectCommandStage(Stage):
    """`analyze --explain`: every attack flow of a capture file gets its `iotscan inspect` command."""

    def __init__(self, idle_timeout: int = 120, active_timeout: int = 1800) -> None:
        super().__init__()
        self.idle_timeout, self.active_timeout = idle_timeout, active_timeout
        self._readable = True

    def begin(self, source: SourceInfo) -> None:
        # stdin or a pipe was read from a temporary copy, gone by the time a person inspects (a compressed file
        # is copied again by inspect)
        self._readable = source.capture is None or not source.capture.spooled or os.path.isfile(source.name)
        if not self._readable:
            self.warn(source.name, "explain", "no inspect commands for this input: inspect reads a capture file, "
                                              "so save or decompress it first")

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        if not self._readable:
            yield from events
            return
        for event in events:
            record = event[0]
            if record is not None and record.get("verdict") == "attack":
                record["inspect"] = inspect_command(record, idle_timeout=self.idle_timeout,
                                                    active_timeout=self.active_timeout)
            yield event


# -- terminal view --------------------------------------------------------------------------------


def hexdump(data: bytes, width: int = 16) -> str:
    """Offset, hex bytes and printable ASCII, as tshark -x and xxd show them."""
    lines = []
    for off in range(0, len(data), width):
        chunk = data[off:off + width]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:04x}  {hexpart:<{width * 3 - 1}}  {text}")
    return "\n".join(lines)


# Field-name prefixes shown as one line each in the terminal view, in this order.
_GROUPS = ("tcp", "icmp", "dns", "http", "ssdp", "tls", "mqtt", "dhcp", "coap", "telnet", "irc", "ftp", "tftp")
_FRAME_KEYS = {name for name, _ in PACKET_FIELDS} | {"ttl", "payload_length", "payload_hex", "expert"}
_LONG_VALUE = 300


def _show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        if value and isinstance(value[0], dict):  # DNS answers
            return "; ".join(" ".join(str(v) for v in (a.get("type"), a.get("data")) if v) for a in value)
        return ", ".join(str(v) for v in value)
    text = str(value)
    if isinstance(value, str) and (any(ord(c) < 32 for c in text) or text != text.strip()):
        text = repr(text)[1:-1]  # telnet data, MQTT payloads: show control characters
    return text if len(text) <= _LONG_VALUE else text[:_LONG_VALUE] + f"... ({len(text):,} chars)"


class PacketTableSink:
    """The terminal view: a header per flow, then one Rich tree per packet, printed as it comes."""

    def __init__(self, out: IO[bytes], width: int | None = None) -> None:
        from rich.console import Console

        self.out = out
        isatty = getattr(out, "isatty", None)
        self.terminal = bool(isatty and isatty())
        self.width = width or (shutil.get_terminal_size((120, 24)).columns if self.terminal else 120)
        self.buffer = io.StringIO()
        self.console = Console(file=self.buffer, force_terminal=self.terminal, width=self.width, highlight=False,
                               soft_wrap=False)
        self.flow: dict[str, Any] | None = None
        self.first_packet_s: dict[int, dt.datetime] = {}  # flow_id -> time of its first packet shown

    def _flush(self) -> None:
        self.out.write(self.buffer.getvalue().encode())
        self.out.flush()
        self.buffer.seek(0)
        self.buffer.truncate()

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("event_type")
        if kind == "flow":
            self.flow = record
            self.console.print(_flow_header(record))
        elif kind == "packet":
            self.console.print(self._packet_tree(record))
        self._flush()

    def _packet_tree(self, r: dict[str, Any]) -> Any:
        from rich.markup import escape
        from rich.tree import Tree

        arrow = {"src2dst": "[cyan]→[/]", "dst2src": "[magenta]←[/]"}.get(r.get("direction") or "", "?")
        at = dt.datetime.strptime(r["timestamp"], "%Y-%m-%dT%H:%M:%S.%f%z")
        first = self.first_packet_s.setdefault(r["flow_id"], at)
        when = at.strftime("%H:%M:%S.%f")
        rel = f"+{(at - first).total_seconds():.6f}s"
        head = (f"[bold]#{r['frame_number']}[/]  {when}  [dim]{rel}[/]  {arrow}  {r['length']:,} B  "
                f"[dim]{escape(' / '.join(r['layers']))}[/]")
        tree = Tree(head, guide_style="dim")
        basics = [f"{k}={_show_value(r[k])}" for k in ("ttl", "payload_length", "reassembled_frames")
                  if r.get(k) is not None]
        groups: dict[str, list[str]] = {}
        for key, value in r.items():
            if key in _FRAME_KEYS or value is None:
                continue
            prefix, _, name = key.partition("_")
            if prefix in _GROUPS:
                groups.setdefault(prefix, []).append(f"{name}={_show_value(value)}")
        if basics and not groups.get("tcp"):
            tree.add(f"[dim]{escape('  '.join(basics))}[/]")
        for prefix in _GROUPS:
            if prefix in groups:
                line = "  ".join(groups[prefix])
                if prefix == "tcp" and basics:
                    line += "  " + "  ".join(basics)
                tree.add(f"[green]{prefix}[/]  {escape(line)}")
        for message in r.get("expert") or []:
            tree.add(f"[yellow]{escape(message)}[/]")
        if r.get("payload_hex"):
            tree.add(escape(hexdump(bytes.fromhex(r["payload_hex"]))))
        return tree

    def close(self, summary: dict[str, Any]) -> None:
        from rich.markup import escape

        lines = [f"[bold]{summary.get('packets') or 0:,}[/] packets of {summary.get('flows') or 0} "
                 f"flow{'s' if summary.get('flows') != 1 else ''} in {summary.get('elapsed_s') or 0:.2f} s"]
        if summary.get("limited"):
            lines[0] += " (--limit reached)"
        for w in summary.get("warnings") or []:
            lines.append(f"[yellow]warning[/] {escape(str(w.get('message')))}")
        for e in summary.get("errors") or []:
            lines.append(f"[red]error[/] {escape(str(e.get('message')))}")
        self.console.print("\n".join(lines))
        self._flush()


def _flow_header(r: dict[str, Any]) -> Any:
    from rich.markup import escape
    from rich.panel import Panel

    proto = _PROTOCOL_LABELS.get(r["protocol"], str(r["protocol"]))
    start = dt.datetime.fromtimestamp(r["first_seen_ms"] / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    facts = [f"{_endpoint(r['src_ip'], r['src_port'])} → {_endpoint(r['dst_ip'], r['dst_port'])}  {proto}",
             f"app {r.get('app') or '?'}" + (f"  server {r['server_name']}" if r.get("server_name") else ""),
             f"{r['packets']:,} packets ({r['src2dst_packets']:,} → / {r['dst2src_packets']:,} ←)  "
             f"{r['bytes']:,} B  from {start[:-3]} UTC for {r['duration_ms'] / 1000:.3f} s",
             f"community_id {r.get('community_id') or '-'}"]
    return Panel(escape("\n".join(facts)), title=f"flow {r['flow_id']}", title_align="left", expand=False)
