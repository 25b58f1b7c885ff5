"""Training manifests: which captures to learn from, and how each flow of them is labeled.

A manifest is a CSV in the format of ``../shared/datasets/MANIFEST.csv``: ``path,label,family,
label_source,note`` (an optional ``source`` column names the dataset a row belongs to). ``path``
may be a glob. Lines starting with ``#`` are comments, except two directives:

* ``# root: DIR`` -- capture paths are relative to DIR (itself relative to the manifest) instead
  of the manifest's own directory;
* ``# source: NAME`` -- every row belongs to dataset NAME (leave-one-source-out groups by it).

Without either, a row's dataset is the first directory of its path (``iot-23/...`` -> ``iot-23``)
when the manifest's paths start with several different directories, else the manifest's directory
name (``lab-data/MANIFEST.csv`` -> ``lab-data``).

Label sources (label files are relative to the manifest's directory):

* ``whole-capture`` -- every flow carries the row's label and family;
* ``device-csv:FILE`` -- benign device captures (FILE maps captures to devices; every flow benign);
* ``zeek-conn-labeled:FILE`` -- IoT-23 per-flow labels, joined on the 5-tuple (either direction)
  and the start time; both layouts (separate ``label``/``detailed-label`` fields, or both packed
  with ``tunnel_parents`` into the last field) are read; flows without a match stay unlabeled and
  are left out;
* ``flow-rules:FILE`` -- a CSV ``src_ip,dst_ip,protocol,dst_port,label,family``: a flow matches a
  rule when its initiator, responder, protocol and responder port equal the rule's non-empty
  fields; the first matching rule wins; unmatched flows get the row's label and family;
* ``flow-filter:FILTER`` -- only the flows matching FILTER carry the row's label and family; the
  file's other flows stay unlabeled (never benign). FILTER is ``all`` or clauses joined by ``;``,
  all of which must hold; a clause ``key=v1|v2|...`` holds when the key's value is any of the
  values. Keys: ``src_ip``, ``dst_ip``, ``src_port``, ``dst_port``, ``protocol`` (IANA number),
  ``ip`` (either address) and ``port`` (either port); a key may repeat (``ip=A;ip=B``: A and B
  are the flow's two ends). Addresses are compared as iotscan's flow records print them (IPv6 in
  compressed form; the filter's own addresses are written that way before comparing).

A file may appear in several ``flow-filter`` rows of one manifest (e.g. the exploit flows and the
C&C flows of one intrusion): each row is its own :class:`CaptureSpec`, labeling only its own flows,
named ``PATH (row N)`` in metrics, and one feature table of the file serves them all. Otherwise a
file listed twice (a glob and a row naming it, or two manifests) is learnt once, from its first row.
"""

from __future__ import annotations

import bisect
import csv
import glob
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iotscan.errors import InputError

FAMILIES = ("ddos", "dos", "scan", "bruteforce", "c2", "exploit", "spoofing")
LABELS = ("benign", "attack")
BENIGN, ATTACK, UNLABELED = 0, 1, -1

# IoT-23 detailed labels -> our families.
ZEEK_FAMILIES = {
    "ddos": "ddos",
    "partofahorizontalportscan": "scan",
    "partofahorizontalportscan-attack": "scan",
    "c&c": "c2",
    "c&c-heartbeat": "c2",
    "c&c-filedownload": "c2",
    "c&c-torii": "c2",
    "c&c-mirai": "c2",
    "c&c-heartbeat-attack": "c2",
    "c&c-heartbeat-filedownload": "c2",
    "c&c-partofahorizontalportscan": "c2",
    "filedownload": "c2",
    "okiru": "c2",
    "okiru-attack": "c2",
    "attack": "exploit",  # IoT-23: attacks from the bot on other hosts (command injection, logins)
}
_PROTO_NAMES = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58, "ipv6-icmp": 58, "sctp": 132}
_ZEEK_TIME_SLACK_S = 2.0


@dataclass(frozen=True)
class FlowKeys:
    """What labelers need of each flow of a capture (arrays, one entry per flow)."""

    src_ip: np.ndarray
    dst_ip: np.ndarray
    src_port: np.ndarray
    dst_port: np.ndarray
    protocol: np.ndarray
    first_ms: np.ndarray
    last_ms: np.ndarray


class Labeler:
    """Turns a capture's flows into labels (1 attack, 0 benign, -1 unlabeled) and families."""

    description = ""

    def label(self, keys: FlowKeys, row_label: int, row_family: str) -> tuple[np.ndarray, np.ndarray]:
        n = len(keys.src_ip)
        return np.full(n, row_label, dtype=np.int8), np.full(n, row_family, dtype=object)


class WholeCapture(Labeler):
    description = "whole-capture"


@dataclass
class FlowRules(Labeler):
    path: Path
    rules: list[tuple[str, str, int | None, int | None, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.description = f"flow-rules:{self.path.name}"
        try:
            with self.path.open(newline="") as f:
                for i, row in enumerate(csv.DictReader(_data_lines(f)), start=2):
                    label, family = _check_label(row.get("label", ""), row.get("family", ""), f"{self.path}:{i}")
                    proto = (row.get("protocol") or "").strip().lower()
                    port = (row.get("dst_port") or "").strip()
                    number = (_PROTO_NAMES[proto] if proto in _PROTO_NAMES else int(proto)) if proto else None
                    self.rules.append(((row.get("src_ip") or "").strip(), (row.get("dst_ip") or "").strip(), number,
                                       int(port) if port else None, label, family))
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read flow rules: {exc.strerror or exc}") from exc
        except (ValueError, KeyError) as exc:
            raise InputError(f"{self.path}: bad flow rule: {exc}") from exc

    def label(self, keys: FlowKeys, row_label: int, row_family: str) -> tuple[np.ndarray, np.ndarray]:
        labels, families = super().label(keys, row_label, row_family)
        done = np.zeros(len(labels), dtype=bool)
        for src, dst, proto, port, label, family in self.rules:
            hit = ~done
            if src:
                hit &= keys.src_ip == src
            if dst:
                hit &= keys.dst_ip == dst
            if proto is not None:
                hit &= keys.protocol == proto
            if port is not None:
                hit &= keys.dst_port == port
            labels[hit] = label
            families[hit] = family
            done |= hit
        return labels, families


# flow-filter keys -> the FlowKeys columns a clause looks at (any of them may hold the value)
_FILTER_KEYS: dict[str, tuple[str, ...]] = {
    "src_ip": ("src_ip",), "dst_ip": ("dst_ip",), "ip": ("src_ip", "dst_ip"),
    "src_port": ("src_port",), "dst_port": ("dst_port",), "port": ("src_port", "dst_port"),
    "protocol": ("protocol",),
}


def parse_flow_filter(text: str) -> list[tuple[str, tuple[str | int, ...]]]:
    """``all`` -> no clause; else (key, values) per clause. ValueError says what is wrong, in one line."""
    text = text.strip()
    if text == "all":
        return []
    if not text:
        raise ValueError("empty filter (use 'all' for every flow)")
    clauses: list[tuple[str, tuple[str | int, ...]]] = []
    for clause in text.split(";"):
        key, eq, values = (part.strip() for part in clause.partition("="))
        if not eq:
            raise ValueError(f"clause {clause.strip()!r} is not key=value")
        if key not in _FILTER_KEYS:
            raise ValueError(f"unknown key {key!r} (keys: {', '.join(_FILTER_KEYS)})")
        items = [v.strip() for v in values.split("|")]
        if not all(items):
            raise ValueError(f"clause {clause.strip()!r} has an empty value")
        clauses.append((key, tuple(_filter_value(key, v) for v in items)))
    return clauses


def _filter_value(key: str, value: str) -> str | int:
    if key.endswith("ip"):
        try:
            # the flow records' form, so that 2001:DB8:0::1 and 2001:db8::1 are one address
            return ipaddress.ip_address(value).compressed
        except ValueError:
            raise ValueError(f"{key}={value}: not an IP address") from None
    limit = 255 if key == "protocol" else 65535
    if not (value.isascii() and value.isdigit()) or int(value) > limit:
        raise ValueError(f"{key}={value}: not a number from 0 to {limit}")
    return int(value)


@dataclass
class FlowFilter(Labeler):
    """The flows matching a filter carry the row's label and family; the others stay unlabeled."""

    text: str
    clauses: list[tuple[str, tuple[str | int, ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.description = f"flow-filter:{self.text}"
        self.clauses = parse_flow_filter(self.text)

    def matches(self, keys: FlowKeys) -> np.ndarray:
        hit = np.ones(len(keys.src_ip), dtype=bool)
        for key, values in self.clauses:
            clause = np.zeros(len(hit), dtype=bool)
            for column in _FILTER_KEYS[key]:
                # cached tables hold addresses as str and numbers as ints: compare like with like
                clause |= np.isin(getattr(keys, column), np.array(values))
            hit &= clause
        return hit

    def label(self, keys: FlowKeys, row_label: int, row_family: str) -> tuple[np.ndarray, np.ndarray]:
        hit = self.matches(keys)
        labels = np.where(hit, row_label, UNLABELED).astype(np.int8)
        families = np.where(hit, row_family, "").astype(object)
        return labels, families


@dataclass
class ZeekConnLabels(Labeler):
    """IoT-23 ``conn.log.labeled``: per-connection labels joined on the 5-tuple and start time."""

    path: Path
    index: dict[tuple, tuple[list[float], list[float], list[tuple[int, str]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.description = f"zeek-conn-labeled:{self.path.name}"
        fields: list[str] = []
        rows: dict[tuple, list[tuple[float, float, int, str]]] = {}
        try:
            with self.path.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line.startswith("#fields"):
                        fields = [name for part in line.split("\t")[1:] for name in part.split()]
                        continue
                    if not line or line.startswith("#"):
                        continue
                    parts = line.split("\t")
                    if len(parts) < len(fields):  # honeypot layout: the last fields packed, space-separated
                        parts = parts[:-1] + parts[-1].split()
                    rec = dict(zip(fields, parts, strict=False))
                    label, family = _zeek_label(rec.get("label", ""), rec.get("detailed-label",
                                                rec.get("det_label", "-")))
                    proto = _PROTO_NAMES.get(rec.get("proto", ""), -1)
                    ts = float(rec["ts"])
                    dur = rec.get("duration", "-")
                    end = ts + (float(dur) if dur not in ("-", "") else 0.0)
                    a = (rec["id.orig_h"], int(rec["id.orig_p"]) if proto not in (1, 58) else 0)
                    b = (rec["id.resp_h"], int(rec["id.resp_p"]) if proto not in (1, 58) else 0)
                    key = (proto, *min(a, b), *max(a, b))
                    rows.setdefault(key, []).append((ts, end, label, family))
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read Zeek labels: {exc.strerror or exc}") from exc
        except (ValueError, KeyError) as exc:
            raise InputError(f"{self.path}: unreadable Zeek conn.log line: {exc}") from exc
        if not fields:
            raise InputError(f"{self.path}: no #fields header: not a Zeek conn.log")
        for key, entries in rows.items():
            entries.sort()
            self.index[key] = ([e[0] for e in entries], [e[1] for e in entries], [(e[2], e[3]) for e in entries])

    def label(self, keys: FlowKeys, row_label: int, row_family: str) -> tuple[np.ndarray, np.ndarray]:
        n = len(keys.src_ip)
        labels = np.full(n, UNLABELED, dtype=np.int8)
        families = np.full(n, "", dtype=object)
        for i in range(n):
            proto = int(keys.protocol[i])
            icmp = proto in (1, 58)
            a = (str(keys.src_ip[i]), 0 if icmp else int(keys.src_port[i]))
            b = (str(keys.dst_ip[i]), 0 if icmp else int(keys.dst_port[i]))
            entry = self.index.get((proto, *min(a, b), *max(a, b)))
            if entry is None:
                continue
            starts, ends, values = entry
            first, last = keys.first_ms[i] / 1000.0, keys.last_ms[i] / 1000.0
            # the Zeek connection that starts closest to the flow, if their spans meet
            j = bisect.bisect_left(starts, first)
            best, best_gap = -1, None
            for k in (j - 1, j):
                if 0 <= k < len(starts):
                    gap = abs(starts[k] - first)
                    overlap = starts[k] <= last + _ZEEK_TIME_SLACK_S and ends[k] >= first - _ZEEK_TIME_SLACK_S
                    if overlap and (best_gap is None or gap < best_gap):
                        best, best_gap = k, gap
            if best >= 0:
                labels[i], families[i] = values[best]
        return labels, families


def _zeek_label(label: str, detail: str) -> tuple[int, str]:
    if label.strip().lower() == "benign":
        return BENIGN, ""
    return ATTACK, ZEEK_FAMILIES.get(detail.strip().lower(), "c2" if detail.strip() in ("", "-") else "exploit")


def _check_label(label: str, family: str, where: str) -> tuple[int, str]:
    label, family = label.strip().lower(), family.strip().lower()
    if label not in LABELS:
        raise InputError(f"{where}: label must be benign or attack, not {label!r}")
    if label == "attack":
        if family not in FAMILIES:
            raise InputError(f"{where}: attack family must be one of {', '.join(FAMILIES)}, not {family!r}")
        return ATTACK, family
    return BENIGN, ""


def _data_lines(f: Sequence[str] | object) -> list[str]:
    return [line for line in f if line.strip() and not line.lstrip().startswith("#")]  # type: ignore[attr-defined]


@dataclass
class CaptureSpec:
    """One labeled capture of a manifest."""

    path: Path
    label: int  # the row's label: ATTACK or BENIGN
    family: str  # the row's family ("" for benign)
    labeler: Labeler
    source: str  # the dataset it belongs to
    manifest: Path
    row: int = 0  # the manifest line it comes from
    shared: bool = False  # the file has other rows (flow filters) in the same manifest

    @property
    def name(self) -> str:
        """How metrics name it: the path, with the row when other rows label other flows of the file."""
        return f"{self.path} (row {self.row})" if self.shared else str(self.path)

    @property
    def partial(self) -> bool:
        """Labels only part of the file's flows (so other rows may label the rest)."""
        return isinstance(self.labeler, FlowFilter)


def read_manifest(manifest: Path) -> list[CaptureSpec]:
    """Every capture a manifest names, with its labeler; a clear InputError for anything wrong."""
    try:
        text = manifest.read_text()
    except OSError as exc:
        raise InputError(f"{manifest}: cannot read manifest: {exc.strerror or exc}") from exc
    base = manifest.parent
    root = base
    source_directive: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            key, _, value = stripped.lstrip("#").partition(":")
            if key.strip() == "root" and value.strip():
                root = (base / value.strip()).resolve()
            elif key.strip() == "source" and value.strip():
                source_directive = value.strip()
    reader = csv.DictReader(_data_lines(text.splitlines(keepends=True)))
    rows = list(reader)
    heads = {Path(r.get("path") or "").parts[0] for r in rows if len(Path(r.get("path") or "").parts) > 1}
    missing = {"path", "label", "family", "label_source"} - set(reader.fieldnames or [])
    if missing:
        raise InputError(f"{manifest}: not a training manifest: missing column(s) {', '.join(sorted(missing))}")
    specs: list[CaptureSpec] = []
    labelers: dict[str, Labeler] = {}
    for i, row in enumerate(rows, start=2):
        where = f"{manifest}:{i}"
        label, family = _check_label(row["label"], row["family"], where)
        source_kind = (row["label_source"] or "").strip()
        if source_kind not in labelers:
            labelers[source_kind] = _labeler(source_kind, base, where)
        pattern = row["path"].strip()
        matches = sorted(glob.glob(str(root / pattern)))
        if not matches:
            raise InputError(f"{where}: no capture matches {pattern!r} (under {root})")
        source = (row.get("source") or "").strip() or source_directive or _default_source(pattern, heads, root,
                                                                                              manifest)
        for match in matches:
            specs.append(CaptureSpec(Path(os.path.normpath(match)), label, family, labelers[source_kind], source,
                                     manifest, row=i))
    if not specs:
        raise InputError(f"{manifest}: the manifest lists no captures")
    partial_rows: dict[Path, int] = {}
    for spec in specs:
        if spec.partial:
            partial_rows[spec.path] = partial_rows.get(spec.path, 0) + 1
    for spec in specs:
        spec.shared = spec.partial and partial_rows[spec.path] > 1
    return specs


def _default_source(pattern: str, heads: set[str], root: Path, manifest: Path) -> str:
    """A multi-dataset manifest's first directories name its datasets; otherwise the manifest's directory does."""
    parts = Path(pattern).parts
    if len(parts) > 1 and len(heads) > 1:
        return parts[0]
    return root.name or manifest.stem


def _labeler(kind: str, base: Path, where: str) -> Labeler:
    name, _, arg = kind.partition(":")
    if name == "whole-capture":
        return WholeCapture()
    if name == "device-csv":
        if not (base / arg).is_file():
            raise InputError(f"{where}: device CSV {arg!r} not found")
        labeler = WholeCapture()
        labeler.description = kind
        return labeler
    if name == "zeek-conn-labeled":
        return ZeekConnLabels(base / arg)
    if name == "flow-rules":
        return FlowRules(base / arg)
    if name == "flow-filter":
        try:
            return FlowFilter(arg)
        except ValueError as exc:
            raise InputError(f"{where}: bad flow filter {arg!r}: {exc}") from exc
    raise InputError(f"{where}: unknown label_source {kind!r} (whole-capture, device-csv:FILE, "
                     "zeek-conn-labeled:FILE, flow-rules:FILE, flow-filter:FILTER)")


def read_manifests(manifests: Sequence[Path]) -> list[CaptureSpec]:
    """The specs of several manifests; a capture listed twice is learnt once, from its first row, except
    that the flow-filter rows of one manifest for one file are all kept (each labels its own flows)."""
    specs: list[CaptureSpec] = []
    first: dict[Path, tuple[int, CaptureSpec]] = {}  # per file: which manifest (by position) and row came first
    for n, manifest in enumerate(manifests):
        for spec in read_manifest(manifest):
            seen = first.get(spec.path)
            if seen is None:
                first[spec.path] = (n, spec)
                specs.append(spec)
            elif seen[0] == n and seen[1].partial and spec.partial:
                specs.append(spec)
    return specs


def select_sources(specs: Sequence[CaptureSpec], names: Sequence[str]) -> list[CaptureSpec]:
    """The specs of the named datasets; an InputError naming the available ones for a name matching none."""
    available = sorted({s.source for s in specs})
    unknown = [n for n in names if n not in available]
    if unknown:
        raise InputError(f"no source named {', '.join(unknown)} in the manifests (sources: {', '.join(available)})")
    wanted = set(names)
    return [s for s in specs if s.source in wanted]
