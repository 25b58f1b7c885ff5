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
  fields; the first matching rule wins; unmatched flows get the row's label and family.
"""

from __future__ import annotations

import bisect
import csv
import glob
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

    @property
    def name(self) -> str:
        return str(self.path)


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
                                     manifest))
    if not specs:
        raise InputError(f"{manifest}: the manifest lists no captures")
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
    raise InputError(f"{where}: unknown label_source {kind!r} (whole-capture, device-csv:FILE, "
                     "zeek-conn-labeled:FILE, flow-rules:FILE)")


def read_manifests(manifests: Sequence[Path]) -> list[CaptureSpec]:
    specs: list[CaptureSpec] = []
    seen: set[Path] = set()
    for manifest in manifests:
        for spec in read_manifest(manifest):
            if spec.path not in seen:  # the same capture listed twice is learnt once
                seen.add(spec.path)
                specs.append(spec)
    return specs
