"""The HTML report (`iotscan report`, `analyze --report`): the record stream summed up as it passes, in bounded
pieces, and written at the end as one self-contained HTML page (report_html: the page; report_plots: its figures).

Nothing here grows with the capture. Flows are counted into time bins that widen when a source's span outgrows
them, into top-N tables cut back to their capacity whenever they hold twice it, into a score histogram,
and into the highest-scored attack flows of each family; device, alert and flood records are kept up to a cap.
"""

from __future__ import annotations

import functools
import heapq
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from iotscan.output.records import is_local_address

TIMELINE_BINS = 160  # most time bins per source: a longer span widens them
TIMELINE_SOURCES = 6  # sources drawn, most flows first
TRACKED_SOURCES = 12  # sources whose bins are kept to choose them (sources come one after another)
MARKERS = 40  # alert and flood marks per source
SCORE_BINS = 20
PAIRS = 2_000  # local host <-> peer pairs kept
GRAPH_PAIRS = 30  # drawn
LOCAL_HOSTS = 200  # local hosts whose flows, bytes and attack flows are counted (what the pairs drawn leave out)
SAMPLES_PER_FAMILY = 10  # attack flows shown per family, highest score first
FAMILIES = 12  # distinct family names kept; the others count as "other"
DISTINCT = 1_000  # distinct sources and targets counted per family ("1,000+")
REASONS = 50
APPS = 500
DEVICES = 300
ALERTS = 200
FLOODS = 100
LISTED = 50  # inputs, warnings and errors listed from the summaries
TEXT = 300  # longest string kept of a record's field

InspectCommand = Callable[[dict[str, Any]], "str | None"]


class TopCounter:
    """Per-key lists whose first item is the key's weight; at most ``capacity`` keys after each cut, made when
    twice as many are held: the heaviest stay. A key cut and seen again starts anew, so its weight may be short
    by what it had at each cut, never more than that cut's lightest key kept (``cut_weight``: the most of those)."""

    def __init__(self, capacity: int, make: Callable[[], list[Any]]) -> None:
        self.capacity, self.make = capacity, make
        self.items: dict[Any, list[Any]] = {}
        self.cut_weight = 0

    def slot(self, key: Any) -> list[Any]:
        item = self.items.get(key)
        if item is None:
            if len(self.items) >= 2 * self.capacity:
                kept = heapq.nlargest(self.capacity, self.items.items(), key=lambda kv: kv[1][0])
                self.cut_weight = max(self.cut_weight, kept[-1][1][0])
                self.items = dict(kept)
            item = self.items[key] = self.make()
        return item

    def top(self, n: int) -> list[tuple[Any, list[Any]]]:
        return heapq.nlargest(n, self.items.items(), key=lambda kv: kv[1][0])

    def __len__(self) -> int:
        return len(self.items)


# Bin widths, in ms, each a multiple of the one before (so that bins merge exactly) and a width a person reads
# at a glance; past a day the width doubles
BIN_WIDTHS = (1, 2, 10, 20, 100, 200, 1000, 2000, 10_000, 30_000, 60_000, 300_000, 600_000, 1_800_000, 3_600_000,
              10_800_000, 21_600_000, 43_200_000, 86_400_000)


class TimeBins:
    """Counts per time bin and series (benign, an attack family...). Bins start 1 ms wide and widen (BIN_WIDTHS)
    whenever the span from the first to the last bin would pass TIMELINE_BINS."""

    def __init__(self) -> None:
        self.width_ms = 1
        self.bins: dict[int, dict[str, int]] = {}
        self.lo = self.hi = 0

    def add(self, time_ms: int, series: str, n: int = 1) -> None:
        i = time_ms // self.width_ms
        lo, hi = (min(self.lo, i), max(self.hi, i)) if self.bins else (i, i)
        while hi - lo >= TIMELINE_BINS:
            wider = next((w for w in BIN_WIDTHS if w > self.width_ms), 2 * self.width_ms)
            factor, self.width_ms = wider // self.width_ms, wider
            i, lo, hi = i // factor, lo // factor, hi // factor
            merged: dict[int, dict[str, int]] = {}
            for j, counts in self.bins.items():
                into = merged.setdefault(j // factor, {})
                for name, count in counts.items():
                    into[name] = into.get(name, 0) + count
            self.bins = merged
        self.lo, self.hi = lo, hi
        counts = self.bins.get(i)
        if counts is None:
            counts = self.bins[i] = {}
        counts[series] = counts.get(series, 0) + n


@dataclass
class SourceTrack:
    """One source's timeline: flows by bin and series, and marks for its alerts and floods."""

    bins: TimeBins = field(default_factory=TimeBins)
    flows: int = 0
    marks: list[tuple[int, str]] = field(default_factory=list)  # (time ms, "alert" or "flood")


@dataclass
class FamilyTally:
    """One attack family: its flows, bytes, distinct sources and targets (up to DISTINCT), first reasons, time span,
    and its highest-scored flows."""

    flows: int = 0
    bytes: int = 0
    sources: set[str] = field(default_factory=set)
    targets: set[str] = field(default_factory=set)
    reasons: TopCounter = field(default_factory=lambda: TopCounter(REASONS, lambda: [0]))
    first_ms: int | None = None
    last_ms: int | None = None
    samples: list[tuple[float, int, int, dict[str, Any]]] = field(default_factory=list)  # min-heap


# What the report keeps of an attack flow shown (a sample may be any record: its long strings are cut)
SAMPLE_FIELDS = ("flow_id", "community_id", "source", "first_seen_ms", "src_ip", "src_port", "dst_ip", "dst_port",
                 "protocol", "app", "server_name", "packets", "bytes", "score", "family", "reasons",
                 "evidence_community_id", "inspect", "src_device", "dst_device")


def short(value: Any, limit: int = TEXT) -> Any:
    """A field's value with its strings cut to ``limit`` characters and its lists to 10 items."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[: limit - 1] + "…"
    if isinstance(value, list):
        return [short(v, limit) for v in value[:10]]
    if isinstance(value, dict):
        return {str(k)[:limit]: short(v, limit) for k, v in list(value.items())[:40]}
    return value


# The first octets of every IPv4 address that is_local_address may call local (private, link-local, reserved):
# any other is public, known without parsing it (a spoofed flood brings a new address with every flow)
_MAYBE_LOCAL_OCTETS = frozenset((0, 10, 100, 127, 169, 172, 192, 198, 203, *range(240, 256)))


@functools.lru_cache(maxsize=1 << 15)
def _local(ip: str) -> bool:
    dot = ip.find(".")
    if 0 < dot < 4 and ip[:dot].isdigit() and int(ip[:dot]) not in _MAYBE_LOCAL_OCTETS:
        return False
    return is_local_address(ip)


class SummaryTotals:
    """The summary records seen (one per run; one per NDJSON file read), added up: numbers summed, counts by name
    merged, lists kept up to LISTED items (with the number of items), anything else as first seen."""

    def __init__(self) -> None:
        self.merged: dict[str, Any] = {}
        self.listed: Counter[str] = Counter()
        self.count = 0

    def add(self, summary: dict[str, Any]) -> None:
        self.count += 1
        into = self.merged
        for key, value in summary.items():
            if key in ("event_type", "packets_per_s", "timestamp"):
                continue
            have = into.get(key)
            if isinstance(value, bool) or value is None:
                into.setdefault(key, value)
            elif isinstance(value, (int, float)):
                into[key] = (have if isinstance(have, (int, float)) else 0) + value
            elif isinstance(value, list):
                self.listed[key] += len(value)
                kept = into.setdefault(key, [])
                kept.extend(short(v) for v in value[: max(0, LISTED - len(kept))])
            elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
                counts = into.setdefault(key, {})
                for name, n in list(value.items())[:REASONS]:
                    counts[name] = counts.get(name, 0) + n
            else:
                into.setdefault(key, short(value))
        elapsed = into.get("elapsed_s")
        if elapsed:
            into["packets_per_s"] = round((into.get("packets") or 0) / elapsed, 1)


class ReportBuilder:
    """The report's sink: every record passes through write() and leaves bounded summaries behind; close()
    writes the page. ``cards`` are the model cards to quote (by name: "flows", "devices"), ``inspect`` gives a
    flow's `iotscan inspect` command, or None when its source is no capture file that can be read again."""

    def __init__(self, out: IO[bytes], *, title: str, cards: dict[str, dict[str, Any]] | None = None,
                 inspect: InspectCommand | None = None, threshold: float | None = None) -> None:
        self.out, self.title = out, title
        self.cards = cards or {}
        self.inspect = inspect
        self.threshold = threshold
        self.seq = 0
        self.sources: dict[str, SourceTrack] = {}
        self.sources_seen = 0
        self.scores: dict[str, list[int]] = {}
        self.families: dict[str, FamilyTally] = {}
        self.pairs = TopCounter(PAIRS, lambda: [0, 0, 0, 0, None])  # bytes, flows, attack flows, packets, name
        self.hosts = TopCounter(LOCAL_HOSTS, lambda: [0, 0, 0])  # local hosts: bytes, flows, attack flows
        self.device_attacks = TopCounter(DEVICES, lambda: [0])  # attack flows by device MAC, either end
        self.apps = TopCounter(APPS, lambda: [0, 0])  # flows, bytes
        self.devices: list[tuple[int, int, dict[str, Any]]] = []  # min-heap on bytes
        self.device_alerts = TopCounter(DEVICES, lambda: [0, Counter()])  # by host MAC or IP: alerts, by kind
        self.flood_targets = TopCounter(DEVICES, lambda: [0])  # floods by target address
        self.alerts: list[tuple[float, int, dict[str, Any]]] = []  # min-heap on score
        self.floods: list[tuple[float, int, dict[str, Any]]] = []  # min-heap on packets
        self.counts: Counter[str] = Counter()  # records by event type
        self.flows_without_pair = 0  # flows with no local end (transit)
        self.unreadable = 0  # records that lack what the report reads (NDJSON from elsewhere)
        self.span: list[int] = []  # first and last flow time, ms
        self.totals = SummaryTotals()
        self.notes: list[str] = []  # what a reader should know of how the report was made (--attacks-only)

    # -- the stream --------------------------------------------------------------------------------------------

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("event_type")
        self.seq += 1
        try:
            if kind == "flow":
                self._flow(record)
            elif kind == "device":
                _push(self.devices, (int(record.get("bytes") or 0), self.seq, short(record)), DEVICES)
            elif kind == "alert":
                self._alert(record)
            elif kind == "flood":
                self._flood(record)
            elif kind == "summary":
                self.totals.add(record)
                return
            elif len(self.counts) >= 2 * FAMILIES and kind not in self.counts:
                kind = "other"
        except (KeyError, TypeError, ValueError, AttributeError):
            self.unreadable += 1
            return
        self.counts[str(kind)] += 1

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.totals.add(summary)
        if not self.totals.count:  # records without any summary (a stream cut short)
            self.totals.add(self.seen_summary())
        from iotscan.output.report_html import render_page  # deferred: it draws with matplotlib

        self.out.write(render_page(self).encode())
        self.out.flush()

    def seen_summary(self) -> dict[str, Any]:
        """A summary made of the records seen, for records that came without one."""
        attacks = {name: t.flows for name, t in self.families.items()}
        return {"event_type": "summary", "flows": self.counts["flow"], "devices": self.counts["device"],
                "attacks": sum(attacks.values()), "attack_families": attacks}

    def _flow(self, r: dict[str, Any]) -> None:
        first, size, verdict = int(r["first_seen_ms"]), int(r.get("bytes") or 0), r.get("verdict")
        attack = verdict == "attack"
        family = _family_name(r.get("family"), self.families) if attack else None
        series = family or {None: "unscored", "benign": "benign"}.get(verdict, "other verdicts")
        self._track(str(r.get("source"))).bins.add(first, series)
        if self.span:
            self.span[0], self.span[1] = min(self.span[0], first), max(self.span[1], first)
        else:
            self.span = [first, first]
        score = r.get("score")
        if score is not None:
            key = verdict if verdict in ("benign", "attack") else "other verdicts"
            histogram = self.scores.get(key) or self.scores.setdefault(key, [0] * SCORE_BINS)
            histogram[min(SCORE_BINS - 1, max(0, int(float(score) * SCORE_BINS)))] += 1
        app = self.apps.slot(r.get("app") or "Unknown")
        app[0] += 1
        app[1] += size
        self._pair(r, size, attack)
        if family is not None:
            self._attack(r, family, first, size, float(score or 0.0))

    def _track(self, source: str, flows: int = 1) -> SourceTrack:
        track = self.sources.get(source)
        if track is None:
            self.sources_seen += 1
            if len(self.sources) >= TRACKED_SOURCES:  # sources come one after another: the fewest flows go
                del self.sources[min(self.sources, key=lambda s: self.sources[s].flows)]
            track = self.sources[source] = SourceTrack()
        track.flows += flows
        return track

    def _pair(self, r: dict[str, Any], size: int, attack: bool) -> None:
        src = r.get("src_device") or r["src_ip"]
        dst = r.get("dst_device") or r["dst_ip"]
        src_local = bool(r.get("src_device")) or _local(r["src_ip"])
        dst_local = bool(r.get("dst_device")) or _local(r["dst_ip"])
        if src_local and dst_local:
            local, peer = (src, dst) if src <= dst else (dst, src)
        elif src_local or dst_local:
            local, peer = (src, dst) if src_local else (dst, src)
        else:
            self.flows_without_pair += 1
            return
        pair = self.pairs.slot((local, peer))
        pair[0] += size
        pair[1] += 1
        pair[2] += attack
        pair[3] += int(r.get("packets") or 0)
        if pair[4] is None and r.get("server_name"):
            pair[4] = short(r["server_name"], 80)
        for end in (local, peer) if src_local and dst_local else (local,):
            host = self.hosts.slot(end)
            host[0] += size
            host[1] += 1
            host[2] += attack

    def _attack(self, r: dict[str, Any], family: str, first: int, size: int, score: float) -> None:
        tally = self.families.get(family)
        if tally is None:
            tally = self.families[family] = FamilyTally()
        tally.flows += 1
        tally.bytes += size
        for mac in {r.get("src_device"), r.get("dst_device")} - {None}:
            self.device_attacks.slot(mac)[0] += 1
        for seen, address in ((tally.sources, r["src_ip"]), (tally.targets, r["dst_ip"])):
            if len(seen) < DISTINCT:
                seen.add(address)
        reasons = r.get("reasons") or []
        if reasons:
            tally.reasons.slot(short(str(reasons[0]), 160))[0] += 1
        tally.first_ms = first if tally.first_ms is None else min(tally.first_ms, first)
        tally.last_ms = first if tally.last_ms is None else max(tally.last_ms, first)
        key = (score, size, -self.seq)
        if len(tally.samples) < SAMPLES_PER_FAMILY or key > tally.samples[0][:3]:
            sample = {name: short(r.get(name)) for name in SAMPLE_FIELDS}
            if not sample["inspect"] and self.inspect is not None:
                sample["inspect"] = self.inspect(r)
            _push(tally.samples, (*key, sample), SAMPLES_PER_FAMILY)

    def _alert(self, r: dict[str, Any]) -> None:
        _push(self.alerts, (float(r.get("score") or 0.0), self.seq, short(r)), ALERTS)
        kind = str(r.get("kind") or "alert")
        for host in {r.get("host_mac"), r.get("host_ip")} - {None}:
            entry = self.device_alerts.slot(str(host))
            entry[0] += 1
            entry[1][kind] += 1
        self._mark(r, "alert")

    def _flood(self, r: dict[str, Any]) -> None:
        _push(self.floods, (float(r.get("packets") or 0), self.seq, short(r)), FLOODS)
        ip = r.get("dst_ip")
        if ip:
            self.flood_targets.slot(str(ip))[0] += 1
        # the flows folded into the record are attacks the summary counts: count them in their family too
        flows, first = int(r.get("flows") or 0), r.get("first_seen_ms")
        if flows and isinstance(first, int):
            family = _family_name(r.get("family"), self.families)
            tally = self.families.get(family) or self.families.setdefault(family, FamilyTally())
            tally.flows += flows
            tally.bytes += int(r.get("bytes") or 0)
            if ip and len(tally.targets) < DISTINCT:
                tally.targets.add(str(ip))
            last = int(r.get("last_seen_ms") or first)
            tally.first_ms = first if tally.first_ms is None else min(tally.first_ms, first)
            tally.last_ms = last if tally.last_ms is None else max(tally.last_ms, last)
            source = str(r.get("source"))
            track = self.sources.get(source)
            if track is not None or len(self.sources) < TRACKED_SOURCES:  # a flood does not evict a timeline
                self._track(source, flows).bins.add(first, family, flows)
        self._mark(r, "flood")

    def _mark(self, r: dict[str, Any], kind: str) -> None:
        track = self.sources.get(str(r.get("source")))
        at = r.get("first_seen_ms") or r.get("decided_ms")
        if track is not None and isinstance(at, int) and len(track.marks) < MARKERS:
            track.marks.append((at, kind))

    # -- records read back ---------------------------------------------------------------------------------------

    def read_records(self, lines: Iterable[bytes], name: str) -> list[str]:
        """Feed the records of iotscan's NDJSON output (a file or stdin) through write(); return the problems
        to warn of. A file without a summary record (cut short) counts for what its records show."""
        before, summaries, bad = self.seq, self.totals.count, 0
        seen = self.seen_summary()
        for line in lines:
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(record, dict) or "event_type" not in record:
                bad += 1
                continue
            self.write(record)
        if self.seq == before:
            raise ValueError("holds no iotscan records (JSON objects with an event_type, one per line)")
        problems = [f"{bad:,} lines are not iotscan records: skipped"] if bad else []
        if self.totals.count == summaries:
            now = self.seen_summary()
            families = {f: n - seen["attack_families"].get(f, 0) for f, n in now["attack_families"].items()}
            self.totals.add({"flows": now["flows"] - seen["flows"], "devices": now["devices"] - seen["devices"],
                             "attacks": now["attacks"] - seen["attacks"],
                             "attack_families": {f: n for f, n in families.items() if n},
                             "inputs": [{"source": name, "flows": now["flows"] - seen["flows"],
                                         "status": "no summary"}]})
            problems.append("no summary record (the output was cut short?): its figures are counted from its records")
        return problems


def _push(heap: list, item: tuple, size: int) -> None:
    """Keep the ``size`` largest items (compared on all but their last element, a record)."""
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item[:-1] > heap[0][:-1]:
        heapq.heapreplace(heap, item)


def _family_name(family: Any, known: dict[str, FamilyTally]) -> str:
    name = str(family or "unknown")[:40]
    return name if name in known or len(known) < FAMILIES - 1 else "other"


def looks_like_records(path: str) -> bool:
    """Whether a file holds iotscan's NDJSON output (by its content, not its name): its first line is a JSON
    object with an event_type. Pipes and FIFOs are left to the capture reader (they can be read only once)."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            head = f.read(1 << 20).lstrip()
    except OSError:
        return False
    if not head.startswith(b"{"):
        return False
    try:
        first = orjson.loads(head.split(b"\n", 1)[0])
    except orjson.JSONDecodeError:
        return False
    return isinstance(first, dict) and "event_type" in first


class TeeSink:
    """`analyze --report`: every record to the normal output and to the report builder."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self, summary: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.close(summary)
