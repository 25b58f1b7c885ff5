"""Feature tables of labeled captures, extracted with the scorer's own code path and cached.

Each capture is metered with :class:`iotscan.capture.source.FlowSource` under the settings ``analyze``
uses, and every flow goes through :class:`iotscan.detect.features.FeatureExtractor` in expiry order,
exactly as the scoring stage sees it. The table (features, nDPI names, the flow keys labels are
joined on) is cached per capture, keyed by the file, its size and time, and a fingerprint of the
feature code, so experiments and retraining do not meter the same captures again. Labels are not
in the cache: they are applied on loading, so the several rows (flow filters) of one file share its
table, and a file is metered once per run even without a cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from iotscan.capture.source import FlowSource, MeterConfig
from iotscan.detect import context, features, request_findings, request_pass, request_signatures
from iotscan.detect.features import FEATURE_NAMES, FeatureExtractor
from iotscan.errors import CaptureError, InputError, IotscanError
from iotscan.output.console import stderr
from iotscan.training.manifest import CaptureSpec, FlowKeys

_EXTRACT_BATCH = 4096


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iotscan" / "features"


@functools.cache
def _feature_code_fingerprint() -> str:
    """Changes whenever the feature code does: a cached table of older code is never reused. Computed
    once per process, so that an edit during a long extraction cannot label old results as new."""
    digest = hashlib.sha256(Path(features.__file__).read_bytes())
    digest.update(Path(context.__file__).read_bytes())
    digest.update(Path(request_pass.__file__).read_bytes())
    digest.update(Path(request_findings.__file__).read_bytes())
    digest.update(Path(request_signatures.__file__).read_bytes())
    digest.update(repr(request_signatures.SIGNATURES).encode())  # every field, the patterns included
    digest.update(repr(sorted(features.METER_SETTINGS.items())).encode())
    return digest.hexdigest()[:16]


@dataclass
class CaptureTable:
    """The feature rows of one capture, with what labeling and grouping need."""

    spec: CaptureSpec
    X: np.ndarray  # (n, len(FEATURE_NAMES)) float32; app/category codes still 0
    apps: np.ndarray  # nDPI master application per row
    categories: np.ndarray
    keys: FlowKeys
    packets: np.ndarray
    y: np.ndarray  # 1 attack, 0 benign, -1 unlabeled
    family: np.ndarray  # family name per row ("" for benign)

    def __len__(self) -> int:
        return len(self.X)


def _cache_file(cache_dir: Path, path: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{features.FEATURE_SCHEMA_VERSION}|" \
          f"{_feature_code_fingerprint()}"
    return cache_dir / f"{path.stem[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def _extract(path: Path) -> dict[str, np.ndarray]:
    # the flow cap `analyze` uses, and its flows as its meter sends them
    config = MeterConfig(source=str(path), reduce=features.metered_flow_with_statistics, **features.METER_SETTINGS)
    extractor = FeatureExtractor(vocabulary=None)
    # as in `analyze`, the request pass's findings are complete before the first rows are taken; if the
    # file is bad, the main pass says what is wrong with it
    with contextlib.suppress(IotscanError):
        extractor.requests = request_pass.read_requests(str(path), config)
    blocks: list[np.ndarray] = []
    meta: dict[str, list] = {k: [] for k in ("src_ip", "dst_ip", "src_port", "dst_port", "protocol", "first_ms",
                                             "last_ms", "packets")}
    for flow in FlowSource(config):
        extractor.add(flow)
        meta["src_ip"].append(flow.src_ip)
        meta["dst_ip"].append(flow.dst_ip)
        meta["src_port"].append(flow.src_port)
        meta["dst_port"].append(flow.dst_port)
        meta["protocol"].append(flow.protocol)
        meta["first_ms"].append(flow.bidirectional_first_seen_ms)
        meta["last_ms"].append(flow.bidirectional_last_seen_ms)
        meta["packets"].append(flow.bidirectional_packets)
        if len(extractor) >= _EXTRACT_BATCH:
            blocks.append(extractor.take())
    blocks.append(extractor.take())
    names = extractor.names
    return {
        "X": np.concatenate(blocks) if blocks else np.empty((0, len(FEATURE_NAMES)), np.float32),
        "apps": np.array([a for a, _ in names], dtype=str),
        "categories": np.array([c for _, c in names], dtype=str),
        "src_ip": np.array(meta["src_ip"], dtype=str),
        "dst_ip": np.array(meta["dst_ip"], dtype=str),
        "src_port": np.array(meta["src_port"], dtype=np.int32),
        "dst_port": np.array(meta["dst_port"], dtype=np.int32),
        "protocol": np.array(meta["protocol"], dtype=np.int16),
        "first_ms": np.array(meta["first_ms"], dtype=np.int64),
        "last_ms": np.array(meta["last_ms"], dtype=np.int64),
        "packets": np.array(meta["packets"], dtype=np.int64),
    }


def _features(path: Path, cache_dir: Path | None) -> dict[str, np.ndarray]:
    """A file's unlabeled feature table, from the cache when it is there."""
    data: dict[str, np.ndarray] | None = None
    cache_file = _cache_file(cache_dir, path) if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except (OSError, ValueError):
            data = None  # a damaged cache entry is rebuilt
    if data is None:
        data = _extract(path)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, **data)
            tmp.replace(cache_file)
    if data["X"].shape[1] != len(FEATURE_NAMES):
        raise InputError(f"{cache_file}: cached table of another feature layout")
    return data


def load_capture(spec: CaptureSpec, cache_dir: Path | None,
                 data: dict[str, np.ndarray] | None = None) -> CaptureTable:
    """The labeled feature table of one capture (of ``data`` when the file's table is already loaded)."""
    if data is None:
        data = _features(spec.path, cache_dir)
    keys = FlowKeys(data["src_ip"], data["dst_ip"], data["src_port"], data["dst_port"], data["protocol"],
                    data["first_ms"], data["last_ms"])
    y, family = spec.labeler.label(keys, spec.label, spec.family)
    return CaptureTable(spec, data["X"], data["apps"], data["categories"], keys, data["packets"], y,
                        np.asarray(family, dtype=object))


def load_captures(specs: Sequence[CaptureSpec], cache_dir: Path | None, progress: bool = True) -> list[CaptureTable]:
    """Extract (or read from the cache) every capture, with a progress bar on a terminal.

    A capture that cannot be read is skipped with a warning, as ``analyze`` does.
    """
    tables: list[CaptureTable] = []
    # per file: its feature table and the rows that labeled its flows so far (several flow-filter rows)
    loaded: dict[Path, dict[str, np.ndarray]] = {}
    labeled_by: dict[Path, list[tuple[CaptureSpec, np.ndarray]]] = {}
    show = progress and stderr.is_terminal
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[flows]}"), TimeElapsedColumn(), console=stderr, transient=True,
                  disable=not show) as bar:
        task = bar.add_task("extracting features", total=len(specs), flows="")
        flows = 0
        for spec in specs:
            bar.update(task, description=f"extracting {spec.path.name[:40]}")
            try:
                if spec.path not in loaded:
                    loaded[spec.path] = _features(spec.path, cache_dir)
                table = load_capture(spec, cache_dir, loaded[spec.path])
            except (CaptureError, InputError) as exc:
                stderr.print(f"[yellow]warning:[/] skipping {spec.name}: {exc.message}")
                bar.advance(task)
                continue
            mine = table.y >= 0
            for other, theirs in labeled_by.get(spec.path, []):
                if np.any(mine & theirs):  # a flow counted twice, maybe with two families: the manifest is wrong
                    stderr.print(f"[yellow]warning:[/] {spec.path}: rows {other.row} and {spec.row} of "
                                 f"{spec.manifest} both label {int(np.sum(mine & theirs))} flow(s)")
            labeled_by.setdefault(spec.path, []).append((spec, mine))
            if len(table):  # a capture without IP flows teaches nothing
                tables.append(table)
            flows += len(table)
            bar.update(task, advance=1, flows=f"{flows:,} flows")
    return tables
