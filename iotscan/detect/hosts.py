"""The host-behaviour stage: how each host behaves over minutes to hours, beside the per-flow model.

The flow model and the signatures judge one flow with its recent context; what holds on any network is
how a host behaves over time: whom it contacts, whether those contacts succeed, what it talks to and
how. This stage keeps bounded state per host over the flow records the scoring stage judged and
decides:

* scans, by connection outcome at any speed (iotscan.detect.scans: Threshold Random Walk);
* compromised devices, from indicators that hold on any network, combined into one suspicion per
  host (iotscan.detect.compromise).

A decision is one ``alert`` record (iotscan.output.records.ALERT_FIELDS), written when it is made, and
marks the flows of that activity: the ones still held here (the evidence, up to HOLD_FLOWS flows and
HOLD_S seconds of capture time back; on an interface LIVE_HOLD_S of wall time) and every later one.
It never sits on the per-packet path: it reads flow records, and the flags NFStream counted per flow
(the meter's statistics block), a batch at a time.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from iotscan.capture.flows import flow_block_dtype
from iotscan.capture.names import registered_domain
from iotscan.capture.side_pass import SidePass
from iotscan.detect.compromise import CompromiseDecision, CompromiseTracker
from iotscan.detect.features import SPLT_PACKETS
from iotscan.detect.replies import TUNNEL_WINDOW_MS, Replies, replies_pass
from iotscan.detect.scans import (
    FAILED,
    ICMP,
    ICMP6,
    NO_CONTACT,
    SUCCEEDED,
    TCP,
    UNANSWERED,
    ScanDecision,
    ScanTracker,
    outcome,
)
from iotscan.output.records import MeteredFlow, alert_record, is_group_address, is_local_address
from iotscan.stage import Event, SourceInfo, Stage

HOLD_FLOWS = 8_192  # flow records held back at most, so that a decision can mark its evidence
HOLD_S = 120.0  # ... and at most this long in capture time (a flow's end to the newest flow's end)
LIVE_HOLD_S = 1.0  # on an interface, at most this long in wall time: records go out promptly
READ_AHEAD = 16_384  # events read ahead at most while the replies pass of a file runs (see _ReadAhead)
SCAN_SCORE = 0.99  # TRW's detection probability: the score of the flows a scan decision marks
PROBE_MAX_PACKETS = 3  # each way: a SYN, an ACK and a RST; a SYN-ACK and a RST or two
PROBE_MAX_FRAME = 78  # bytes: Ethernet, IPv4 and TCP headers with options, no payload
BULK_DATAGRAM = 1_000  # bytes on average: datagrams a scanner does not send (its probes are small)
_FLAG_FIELDS = ("src2dst_syn_packets", "dst2src_syn_packets", "dst2src_rst_packets")


class _Held:
    """A flow record held back, with what the trackers made of it."""

    __slots__ = ("event", "first_contact", "result", "src", "suspect", "tunnel")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.src: str = event[0]["src_ip"]  # type: ignore[index]
        self.result = NO_CONTACT
        self.first_contact = False
        self.suspect: str | None = None  # the family of a compromised host's activity the flow belongs to
        self.tunnel: str | None = None  # the reason, for a query of a DNS tunnel


class _ReadAhead:
    """The stages' events before this one, some read ahead: while the replies pass still runs, the main process
    meters and scores the flows that come next (up to READ_AHEAD) instead of waiting idle for it. They are taken
    in the same order as ever, so what this stage decides and writes does not change."""

    def __init__(self, events: Iterator[Event]) -> None:
        self.events = iter(events)
        self.ahead: deque[Event] = deque()

    def __iter__(self) -> _ReadAhead:
        return self

    def __next__(self) -> Event:
        return self.ahead.popleft() if self.ahead else next(self.events)

    def fill(self, ready: Callable[[], bool]) -> None:
        """Read ahead until ``ready()`` (checked between events), the cap, or the end of the events."""
        ahead, events = self.ahead, self.events
        while not ready() and len(ahead) < READ_AHEAD:
            event = next(events, None)
            if event is None:
                return
            ahead.append(event)


class HostStage(Stage):
    """Per-host behaviour over the scored flow records: alerts, and the flows they mark."""

    def __init__(self, hold_flows: int = HOLD_FLOWS, hold_s: float = HOLD_S, live_hold_s: float = LIVE_HOLD_S) -> None:
        super().__init__()
        self.hold_flows, self.hold_s, self.live_hold_s = hold_flows, hold_s, live_hold_s
        self.scans = ScanTracker()
        self.compromise = CompromiseTracker()
        self.alerts: Counter[str] = Counter()
        self._tunnels: set[tuple[str, str]] = set()  # (client, domain) alerted
        self._source = ""
        self._live = False
        self._answers_seen = False
        self._dtype = flow_block_dtype(SPLT_PACKETS)
        self._info: SourceInfo | None = None
        self._pass: SidePass | None = None
        self.replies = Replies()
        self._replies_final = False

    def begin(self, source: SourceInfo) -> None:
        # a capture is a network of its own: its hosts' addresses mean nothing in the next one
        self.scans = ScanTracker()
        self.compromise = CompromiseTracker()
        self._tunnels = set()
        self._source = source.name
        self._info = source
        self._live = source.config.live
        self._answers_seen = False
        self._dtype = flow_block_dtype(source.config.splt or SPLT_PACKETS)
        self._abandon_pass()
        self.replies, self._replies_final = Replies(), False

    def metering(self) -> None:
        """The replies pass beside the main one, now that the main meter runs (so the forks do not race), not at
        this stage's first flow: the stages ahead hold flows back for their own passes."""
        if self._pass is None and self._info is not None and not self._replies_final:
            self._pass, self.replies = replies_pass(self._info.config.source, self._info.config)
            self._pass.start()

    def _replies_ready(self) -> bool:
        """Whether observing would not wait for the replies pass (on a file it reads ahead, to its end)."""
        return self._replies_final or self._live or self._pass is None or not self._pass.is_alive()

    def _wait_for_replies(self) -> None:
        """On a file, the replies pass has read ahead of the main one: its answers are complete once it ends
        (a failed pass is a warning: decisions then go without DNS answers and ICMP errors)."""
        if self._replies_final or self._live or self._pass is None:
            return
        self._pass.end()
        if self._pass.error is not None:
            self.warn(self._source, "replies_pass", f"DNS answers and ICMP errors pass failed: {self._pass.error}")
        self._replies_final = True

    def _abandon_pass(self) -> None:
        if self._pass is not None:
            self._pass.stop()
            self._pass = None

    def end(self, source: SourceInfo) -> None:
        if self._pass is not None and self._live:
            self._pass.end()
        self._abandon_pass()

    def finish(self) -> list[dict[str, Any]]:
        self._abandon_pass()
        return []

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        held: deque[_Held] = deque()
        pending: list[_Held] = []  # held, not observed yet: observed a batch at a time
        oldest_wall = 0.0
        source = _ReadAhead(events)
        for event in source:
            record, flow = event
            if record is None or flow is None:  # a heartbeat, or a record of another kind: passed on
                if record is None and held and self._live and time.monotonic() - oldest_wall >= self.live_hold_s:
                    yield from self._observe(pending)
                    yield from self._release(held, len(held))
                yield event
                continue
            item = _Held(event)
            if not held:
                oldest_wall = time.monotonic()
            held.append(item)
            pending.append(item)
            if len(pending) >= 1024 or self._live:
                source.fill(self._replies_ready)
                yield from self._observe(pending)
            over = self._over_bound(held, oldest_wall)
            if over:
                source.fill(self._replies_ready)
                yield from self._observe(pending)
                yield from self._release(held, over)
                if held:
                    oldest_wall = time.monotonic()
        yield from self._observe(pending)
        yield from self._release(held, len(held))

    def _over_bound(self, held: deque[_Held], oldest_wall: float) -> int:
        """How many of the oldest held flows must go now."""
        if self._live:
            return len(held) if time.monotonic() - oldest_wall >= self.live_hold_s or len(held) > self.hold_flows \
                else 0
        if len(held) > self.hold_flows:
            return len(held) - self.hold_flows
        newest = held[-1].event[0]["last_seen_ms"]  # type: ignore[index]
        horizon = newest - self.hold_s * 1000
        n = 0
        for item in held:
            if item.event[0]["last_seen_ms"] >= horizon:  # type: ignore[index]
                break
            n += 1
        return n

    def _observe(self, pending: list[_Held]) -> list[Event]:
        """Fold the pending flows into the trackers, in arrival order; the alerts they decide."""
        if not pending:
            return []
        self._wait_for_replies()
        is_error = self.replies.is_error
        flags = flow_flags([item.event[1] for item in pending], self._dtype)
        alerts: list[Event] = []
        observe = self.scans.observe
        for item, (src_syn, dst_syn, dst_rst) in zip(pending, flags, strict=True):
            r = item.event[0]
            assert r is not None
            dst_packets = r["dst2src_packets"]
            if dst_packets and not self._answers_seen:
                self._answers_seen = True
            if is_group_address(r["dst_ip"]) or (r["protocol"] in (ICMP, ICMP6) and is_error(r["src_ip"], r["dst_ip"])):
                continue  # no host's contact: a group's, or an error answering the other host
            src, dst, protocol = r["src_ip"], r["dst_ip"], r["protocol"]
            if r["dst_port"] == 53:
                item.tunnel = self._tunnel(r, alerts)
            result = outcome(protocol, src_syn, dst_syn, dst_rst, r["src2dst_packets"], dst_packets,
                             self._answers_seen)
            if protocol != TCP and r["src2dst_bytes"] >= BULK_DATAGRAM * r["src2dst_packets"]:
                result = NO_CONTACT  # no probe: a client's full datagrams (QUIC pads its first to 1,200 bytes)
            if result == UNANSWERED and is_error(dst, src):
                result = FAILED  # the host answered with an ICMP error: refused
            if result != SUCCEEDED and self.replies.resolved_before(src, dst, r["first_seen_ms"]):
                result = NO_CONTACT  # a service looked up by name and down: no probe (scanners enumerate addresses)
            item.result = result
            if result != NO_CONTACT:
                first_contact, decision = observe(src, dst, r["dst_port"], protocol, result, r["first_seen_ms"],
                                                  r.get("community_id"))
                item.first_contact = first_contact
                if decision is not None:
                    alerts.append((self._scan_alert(decision, r), None))
                    if is_local_address(src):
                        self._compromised(self.compromise.scanned(src, r["first_seen_ms"], _scan_reason(decision)),
                                          r, alerts)
            if is_local_address(src) and not is_local_address(dst):
                fresh = protocol != TCP or bool(src_syn)
                resolved = self.replies.resolved_before(src, dst, r["first_seen_ms"]) \
                    if self.replies.asked_dns(src) else None
                item.suspect, decided = self.compromise.observe(
                    src, dst, r["dst_port"], protocol, "" if r.get("app_guessed") else r.get("app") or "",
                    r["first_seen_ms"], fresh, True, resolved,
                    r.get("community_id"))
                self._compromised(decided, r, alerts)
        pending.clear()
        return alerts

    def _release(self, held: deque[_Held], n: int) -> Iterator[Event]:
        """The oldest n held flows, marked by the decisions made so far."""
        scanner, compromised = self.scans.scanner, self.compromise.decided.get
        for _ in range(n):
            item = held.popleft()
            record: dict[str, Any] = item.event[0]  # type: ignore[assignment]
            decision = scanner(item.src)
            if decision is not None and record["first_seen_ms"] >= decision.first_ms and (
                    item.result in (FAILED, UNANSWERED) or (item.first_contact and _probe_like(record))):
                _mark(record, "scan", SCAN_SCORE, _scan_reason(decision), decision.examples)
            elif item.tunnel is not None:
                _mark(record, "c2", 1.0, item.tunnel, ())
            elif item.suspect is not None:
                host = compromised(item.src)
                if host is not None and record["first_seen_ms"] >= host.first_ms:
                    _mark(record, item.suspect, host.score, f"a flow of a host that behaves as a compromised "
                                                            f"device: {host.reasons[0]}", host.examples)
            yield item.event

    def _tunnel(self, record: dict[str, Any], alerts: list[Event]) -> str | None:
        """The reason to mark a DNS query of a tunnel (its client asked many long names under its domain), and the
        alert once per client and domain."""
        client, name = record["src_ip"], record.get("server_name")
        tally = self.replies.tunnel(client, name)
        if tally is None or record["first_seen_ms"] < tally.first_ms:
            return None
        domain = registered_domain(name or "") or ""
        reason = f"{client} asked {len(tally.names)} distinct long names under {domain} within " \
                 f"{TUNNEL_WINDOW_MS // 60_000} minutes: data tunnelled through DNS"
        if (client, domain) not in self._tunnels:
            self._tunnels.add((client, domain))
            self.alerts["compromised"] += 1
            alerts.append((alert_record(
                decided_ms=tally.decided_ms or record["first_seen_ms"], source=self._source, kind="compromised",
                detail="dns_tunnel", family="c2", score=1.0, host_ip=client, host_mac=record.get("src_mac"),
                host_device=record.get("src_device"), message=reason, reasons=[reason],
                evidence={"distinct_names": len(tally.names),
                          "mean_name_characters": round(tally.characters / len(tally.names), 1), "domain": domain},
                first_seen_ms=tally.first_ms, last_seen_ms=tally.decided_ms,
                evidence_community_ids=[record["community_id"]] if record.get("community_id") else []), None))
        return reason

    def _compromised(self, decision: CompromiseDecision | None, record: dict[str, Any], alerts: list[Event]) -> None:
        if decision is None:
            return
        self.alerts["compromised"] += 1
        alerts.append((alert_record(
            decided_ms=decision.decided_ms, source=self._source, kind="compromised", detail=decision.kinds[0],
            family=decision.family, score=round(decision.score, 3), host_ip=decision.host,
            host_mac=record.get("src_mac"), host_device=record.get("src_device"),
            message=f"{decision.host} behaves as a compromised device: {'; '.join(decision.reasons)}",
            reasons=list(decision.reasons), evidence=dict(decision.evidence), first_seen_ms=decision.first_ms,
            last_seen_ms=decision.decided_ms, evidence_community_ids=list(decision.examples)), None))

    def _scan_alert(self, decision: ScanDecision, record: dict[str, Any]) -> dict[str, Any]:
        self.alerts["scan"] += 1
        what = f"{decision.failed} of {decision.first_contacts} first contacts failed"
        reason = _scan_reason(decision)
        return alert_record(
            decided_ms=decision.decided_ms, source=self._source, kind="scan", detail=decision.kind, family="scan",
            score=SCAN_SCORE, host_ip=decision.source, host_mac=record.get("src_mac"),
            host_device=record.get("src_device"),
            message=f"{decision.source} is scanning ({decision.kind}): {what}, {decision.hosts} hosts, "
                    f"{decision.ports} ports",
            reasons=[reason],
            evidence={"failed_first_contacts": decision.failed, "first_contacts": decision.first_contacts,
                      "hosts": decision.hosts, "ports": decision.ports,
                      "log_likelihood_ratio": round(decision.ratio, 2)},
            first_seen_ms=decision.first_ms, last_seen_ms=decision.decided_ms,
            evidence_community_ids=list(decision.examples))

    def capture_result(self) -> tuple[list[dict[str, str]], Counter[str]]:
        """The capture's warnings and alerts by kind, taken (merged into the run's: add_capture_result)."""
        alerts, self.alerts = self.alerts, Counter()
        return super().capture_result(), alerts

    def add_capture_result(self, result: tuple[list[dict[str, str]], Counter[str]]) -> None:
        warnings, alerts = result
        super().add_capture_result(warnings)
        self.alerts.update(alerts)

    def summarize(self, summary: dict[str, Any]) -> None:
        super().summarize(summary)
        summary["alerts"] = sum(self.alerts.values())
        summary["alert_kinds"] = dict(self.alerts.most_common())


def flow_flags(flows: list[Any], dtype: np.dtype) -> list[tuple[int, int, int]]:
    """SYNs from the initiator, SYNs and RSTs from the responder, per flow, as NFStream counted them: decoded from
    the meter's statistics blocks (``dtype``: capture.source.flow_block_dtype) a batch at a time."""
    blocks = [f.statistics for f in flows if type(f) is MeteredFlow and f.statistics is not None]
    if len(blocks) == len(flows):
        decoded = np.frombuffer(b"".join(blocks), dtype=dtype)
        return list(zip(*(decoded[name].tolist() for name in _FLAG_FIELDS), strict=True))
    return [tuple(int(getattr(f, name, 0) or 0) for name in _FLAG_FIELDS) for f in flows]  # type: ignore[misc]


def _probe_like(record: dict[str, Any]) -> bool:
    """A scanner's probe that found an open port (a handshake, then a reset), not a connection that exchanged data:
    a scanner's own ordinary traffic (its DNS, its controller) is not the scan."""
    sent, back = record["src2dst_packets"], record["dst2src_packets"]
    return sent <= PROBE_MAX_PACKETS and back <= PROBE_MAX_PACKETS \
        and record["src2dst_bytes"] <= PROBE_MAX_FRAME * sent and record["dst2src_bytes"] <= PROBE_MAX_FRAME * back


def _scan_reason(decision: ScanDecision) -> str:
    return (f"this host's first contacts mostly fail: a {decision.kind} scan ({decision.failed} of "
            f"{decision.first_contacts} failed; Threshold Random Walk)")


def _mark(record: dict[str, Any], family: str, score: float, reason: str, examples: tuple[str, ...]) -> None:
    """A flow of a decided activity: an attack, unless something already named it one."""
    if record.get("verdict") == "attack":
        return
    record["verdict"] = "attack"
    record["family"] = family
    record["score"] = max(record.get("score") or 0.0, score)
    record["reasons"] = [reason]
    if examples:
        record["evidence_community_id"] = examples[0]
