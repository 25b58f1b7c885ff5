"""Evaluation of the whole `iotscan analyze` pipeline on labeled captures: every stage, as a user runs it.

The flow model's figures (iotscan.training.evaluate) come from its feature tables; what a user gets also
depends on the stages after it (the host-behaviour stage marks flows of scans and compromised hosts), so
this runs each capture file through the real pipeline once, keeps what the metrics need of each flow
record (its 5-tuple, times, verdict, family, score) and of each alert, and labels the flows with the
manifest's labelers, as the feature tables are labeled. Memory is one capture's flows at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iotscan.capture.source import MeterConfig
from iotscan.pipeline import Analysis
from iotscan.stage import Stage
from iotscan.training.evaluate import Predictions, _add, _empty
from iotscan.training.manifest import CaptureSpec, FlowKeys


@dataclass
class _Collected:
    """What the metrics need of one capture's records."""

    keys: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    alerts: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("event_type")
        if kind == "flow":
            k = self.keys
            for name in ("src_ip", "dst_ip", "src_port", "dst_port", "protocol", "first_seen_ms", "last_seen_ms",
                         "score", "family"):
                k[name].append(record.get(name))
            k["attack"].append(record.get("verdict") == "attack")
        elif kind == "alert":
            self.alerts.append(record)

    def close(self, summary: dict[str, Any]) -> None:
        self.errors = summary.get("errors") or []


@dataclass
class _Table:
    """The shape evaluate.Predictions are filled from."""

    spec: CaptureSpec
    y: np.ndarray
    family: np.ndarray


@dataclass
class PipelineResult:
    predictions: Predictions
    alerts: dict[str, list[dict[str, Any]]]  # by capture file
    failed: list[str]


def run_capture(path: Path, stages: Sequence[Stage], config: MeterConfig) -> _Collected:
    """One capture file through the pipeline; what the metrics need of its records."""
    sink = _Collected()
    analysis = Analysis(sink, stages=stages)
    analysis.run_files([path], config)
    analysis.finish()
    return sink


def evaluate_pipeline(specs: Sequence[CaptureSpec], make_stages: Callable[[], list[Stage]], config: MeterConfig,
                      progress: Callable[[str], None] | None = None) -> PipelineResult:
    """Every capture of ``specs`` through the pipeline (new stages per file: context is per capture)."""
    by_file: dict[Path, list[CaptureSpec]] = defaultdict(list)
    for spec in specs:
        by_file[spec.path].append(spec)
    preds = _empty()
    alerts: dict[str, list[dict[str, Any]]] = {}
    failed: list[str] = []
    for i, (path, file_specs) in enumerate(by_file.items(), start=1):
        if progress is not None:
            progress(f"[{i}/{len(by_file)}] {path}")
        got = run_capture(path, make_stages(), config)
        if got.errors:
            failed.append(f"{path}: {got.errors[0].get('message')}")
            continue
        alerts[str(path)] = got.alerts
        k = got.keys
        if not k:
            continue
        keys = FlowKeys(np.asarray(k["src_ip"], dtype=object), np.asarray(k["dst_ip"], dtype=object),
                        np.asarray(k["src_port"]), np.asarray(k["dst_port"]), np.asarray(k["protocol"]),
                        np.asarray(k["first_seen_ms"]), np.asarray(k["last_seen_ms"]))
        attack = np.asarray(k["attack"], dtype=bool)
        family = np.asarray([f or "" for f in k["family"]], dtype=object)
        score = np.asarray([s if s is not None else 0.0 for s in k["score"]], dtype=float)
        for spec in file_specs:
            y, fam = spec.labeler.label(keys, spec.label, spec.family)
            _add(preds, _Table(spec, np.asarray(y), np.asarray(fam, dtype=object)), score, attack, family)
    return PipelineResult(preds, alerts, failed)
