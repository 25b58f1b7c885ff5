"""What runs in a Dask worker: one capture analysed as `iotscan analyze` analyses it, its records spooled.

A worker keeps the stages it built (models verified and loaded, imports warm) for the next capture of the same
run: what one `analyze` process pays once per run, a worker pays once per run too, not once per capture. The
records of a capture go to a spool file of NDJSON on the worker's disk as they come (memory follows the
capture's active flows, as in one process); a small one comes back whole with the outcome, a larger one is read
by the client in chunks (client.py).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iotscan import __version__
from iotscan.capture.inputs import CaptureFile, is_url, open_capture
from iotscan.capture.source import MeterConfig
from iotscan.errors import ExitCode, InputError, IotscanError
from iotscan.output.console import bytes_read_by
from iotscan.output.sinks import NdjsonSink
from iotscan.pipeline import Analysis, RunState
from iotscan.stage import Stage

INLINE_BYTES = 1 << 20  # a capture's records up to this size come back with its outcome
CHUNK_BYTES = 8 << 20  # larger ones are read in chunks of this size
ATTEMPTS = 2  # a capture whose worker died is given once more (to another worker: the dead one is gone)
PROGRESS_EVERY_S = 1.0


@dataclass(frozen=True)
class RunSpec:
    """What every capture of a run is analysed with: sent once to every worker."""

    token: str  # names the run's spool directory, progress topic and attempt records
    config: MeterConfig
    build_stages: Callable[[], list[Stage]]
    stage_cards: tuple[str | None, ...]  # SHA-256 of the model each of the client's stages verified (None: no model)
    fail_on: str | None = None
    attacks_only: bool = False
    emit_flows: bool = True
    version: str = __version__


@dataclass(frozen=True)
class SpoolRef:
    """Where a capture's records wait on a worker's disk."""

    worker: str
    host: str
    path: str
    size: int
    device: int
    inode: int


@dataclass
class CaptureOutcome:
    """What a worker sends back for one capture: its counts and stage results, and its records (or where they are)."""

    index: int
    name: str
    worker: str = ""
    state: RunState = field(default_factory=RunState)
    results: list[Any] | None = None  # the stages' capture_result(), None when the capture never started
    records: bytes = b""
    spool: SpoolRef | None = None
    lines: int = 0  # records written
    seconds: float = 0.0
    size: int = 0  # bytes of the capture
    fatal: tuple[str, int] | None = None  # (message, exit code): no capture can be analysed (the models)


def progress_topic(token: str) -> str:
    return f"iotscan-progress-{token}"


def spool_dir(token: str) -> Path:
    """This user's private directory for one run's spool files."""
    folder = Path(tempfile.gettempdir()) / f"iotscan-spool-{os.getuid()}-{token}"
    folder.mkdir(mode=0o700, exist_ok=True)
    found = folder.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise InputError(f"{folder}: not a directory of this user's alone: refusing to spool records there")
    return folder


def remove_spools(token: str) -> None:
    """The run's spool files on this worker, removed (the client runs it on every worker at the end)."""
    shutil.rmtree(Path(tempfile.gettempdir()) / f"iotscan-spool-{os.getuid()}-{token}", ignore_errors=True)


def read_spool(path: str, offset: int, length: int, last: bool) -> bytes:
    """A chunk of a spool file, for a client on another machine; the file is removed after its last chunk."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if last:
        os.unlink(path)
    return data


def run_spec(spec: RunSpec) -> RunSpec:
    """The run's spec as a task of its own, which every capture's task depends on: sent to each worker once."""
    return spec


def analyze_capture(spec: RunSpec, index: int, item: str | CaptureFile, attempt: str) -> CaptureOutcome | None:
    """Analyse one capture (a path or URL as the user gave it, or a capture the client copied: stdin) in this
    worker. None when the client cancelled it (Ctrl-C) while it ran."""
    from distributed import get_worker

    started = time.monotonic()
    worker = get_worker()
    name = item.display_name if isinstance(item, CaptureFile) else display_name(item)
    outcome = CaptureOutcome(index=index, name=name, worker=worker.address)
    died_on = _count_attempt(spec.token, attempt, worker.address)
    if died_on:
        outcome.state.error(name, f"the workers analysing it died {len(died_on)} times ({', '.join(died_on)}): "
                                  "killed, out of memory or crashed", ExitCode.CAPTURE)
        return outcome
    _allow_children()
    try:
        stages = _STAGES.take(spec)
    except IotscanError as exc:
        outcome.fatal = (f"worker {worker.address}: {exc.message}", int(exc.exit_code))
        return outcome
    try:
        return _analyze(spec, stages, item, outcome, worker, started)
    finally:
        _STAGES.give_back(spec, stages)


def _analyze(spec: RunSpec, stages: list[Stage], item: str | CaptureFile, outcome: CaptureOutcome, worker: Any,
             started: float) -> CaptureOutcome | None:
    opened = item if isinstance(item, CaptureFile) else open_capture(item)
    if isinstance(opened, CaptureFile):
        outcome.size = opened.size
    fd, spool = tempfile.mkstemp(dir=spool_dir(spec.token), suffix=".ndjson")
    watcher = None
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            sink = _CountingSink(out)
            analysis = _WorkerAnalysis(sink, stages, fail_on=spec.fail_on, attacks_only=spec.attacks_only,
                                       emit_flows=spec.emit_flows)
            watcher = _Watcher(analysis, worker, worker.get_current_task(), progress_topic(spec.token), outcome)
            watcher.start()
            try:
                analysis.run_item(opened, spec.config)
            except IotscanError as exc:  # a model that fails to load at the first batch: no capture can be analysed
                outcome.fatal = (f"worker {worker.address}: {exc.message}", int(exc.exit_code))
            finally:
                watcher.finish()
        if watcher.cancelled:
            os.unlink(spool)
            return None
        outcome.state, outcome.results, outcome.lines = analysis.state, analysis.results, sink.lines
        found = os.stat(spool)
        if found.st_size <= INLINE_BYTES:
            outcome.records = Path(spool).read_bytes()
            os.unlink(spool)
        else:
            outcome.spool = SpoolRef(worker=worker.address, host=socket.gethostname(), path=spool,
                                     size=found.st_size, device=found.st_dev, inode=found.st_ino)
        outcome.seconds = time.monotonic() - started
        return outcome
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(spool)
        raise


def display_name(raw: str) -> str:
    """The capture's name as a single process gives it (CaptureFile.display_name): flow ids depend on it."""
    return raw if is_url(raw) or raw == "-" else str(Path(raw))


def _count_attempt(token: str, attempt: str, address: str) -> list[str]:
    """Note that this worker starts the capture; the workers that started it before, if it must not start again.

    Dask starts a task again on another worker when its worker dies; a capture that takes its worker down
    (a crash, the kernel's OOM killer) would take them all down in turn. The scheduler keeps the record.
    """
    from distributed import get_client

    client = get_client()
    path = ["iotscan", token, attempt]
    before = list(client.get_metadata(path, default=None) or ())
    if len(before) >= ATTEMPTS:
        return before
    client.set_metadata(path, [*before, address])
    return []


def _allow_children() -> None:
    """Dask starts worker processes as daemons, and a daemon may not start processes: iotscan's meters are
    processes of their own (they end with their parent: PR_SET_PDEATHSIG, see capture/source.py)."""
    process = multiprocessing.current_process()
    if process.daemon:
        process.daemon = False


class _StagePool:
    """The stages each thread of this worker built for a run, kept for the run's next captures (models loaded,
    imports warm); a thread takes a set, or builds one, for each capture. Only the latest run's are kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._token = ""
        self._idle: list[list[Stage]] = []

    def take(self, spec: RunSpec) -> list[Stage]:
        with self._lock:
            if self._token == spec.token and self._idle:
                return self._idle.pop()
        if spec.version != __version__:
            raise InputError(f"this worker runs iotscan {__version__}, the client {spec.version}: install the same "
                             "iotscan on the workers")
        stages = spec.build_stages()
        cards = tuple((getattr(stage, "card", None) or {}).get("sha256") for stage in stages)
        if cards != spec.stage_cards:
            raise IotscanError(f"this worker's models (SHA-256 {_short(cards)}) are not the client's "
                               f"({_short(spec.stage_cards)}): install the same iotscan on the workers", ExitCode.MODEL)
        return stages

    def give_back(self, spec: RunSpec, stages: list[Stage]) -> None:
        with self._lock:
            if self._token != spec.token:
                self._token, self._idle = spec.token, []
            self._idle.append(stages)


def _short(cards: tuple[str | None, ...]) -> str:
    return ", ".join(f"{c[:12]}..." if c else "none" for c in cards)


_STAGES = _StagePool()


class _CountingSink(NdjsonSink):
    """The spool: records as NDJSON, counted."""

    lines = 0

    def write(self, record: dict[str, Any]) -> None:
        self.lines += 1
        super().write(record)


class _WorkerAnalysis(Analysis):
    """Analysis of one capture in a worker: errors and warnings go to the client in the outcome (which says them),
    and so do the stages' results of the capture (merged there, in input order)."""

    results: list[Any] | None = None

    def capture_ended(self, results: list[Any]) -> None:
        self.results = results

    def _fail(self, source: str, message: str, code: ExitCode = ExitCode.USAGE) -> None:
        self.state.error(source, message, code)

    def _warn(self, source: str, code: str, message: str) -> None:
        self.state.warn(source, code, message)


class _Watcher(threading.Thread):
    """Beside a capture's analysis: tells the client how far it got (bytes read, flows, attacks) every second, and
    stops the analysis when the client cancels the capture (Ctrl-C)."""

    def __init__(self, analysis: Analysis, worker: Any, key: Any, topic: str, outcome: CaptureOutcome) -> None:
        super().__init__(name="iotscan-watcher", daemon=True)
        self.analysis, self.worker, self.key, self.topic, self.outcome = analysis, worker, key, topic, outcome
        self.cancelled = False
        self._done = threading.Event()

    def run(self) -> None:
        last = time.monotonic()
        while not self._done.wait(0.25):
            task = self.worker.state.tasks.get(self.key)
            if task is None or task.state == "cancelled":
                self.cancelled = True
                self.analysis.stop()
                return
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                source, state = self.analysis.current_source, self.analysis.state
                done = bytes_read_by(source.pid, source.config.source) if source is not None else None
                with contextlib.suppress(Exception):  # progress is best effort
                    self.worker.log_event(self.topic, [self.outcome.index, done or 0, state.flows, state.attacks])

    def finish(self) -> None:
        self._done.set()
        self.join()
