"""The client's side of a parallel run: captures handed to the workers, their records written as they come back.

Captures go out a window at a time (a few per worker thread), so the client holds a bounded number of them
whatever the number of inputs; each capture's records are written together, in their order, as soon as its
worker is done (Dask's as_completed), or in input order with --ordered (captures done early wait, on their
workers, within the window). What the stages gathered over each capture (the device tables) is merged here in
input order whatever order the captures end in: captures done early wait pickled in a temporary file, so memory
stays flat there too. The device records and the summary are then written as a single process writes them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from iotscan.capture.inputs import STDIN, CaptureFile, InputProblem, capture_file, listed
from iotscan.capture.source import MeterConfig
from iotscan.cluster.worker import (
    CHUNK_BYTES,
    CaptureOutcome,
    RunSpec,
    SpoolRef,
    analyze_capture,
    display_name,
    progress_topic,
    read_spool,
    remove_spools,
    run_spec,
)
from iotscan.errors import ExitCode, IotscanError
from iotscan.output.console import Reporter, error
from iotscan.output.sinks import Sink
from iotscan.pipeline import Analysis, RunState, interruptible
from iotscan.stage import Stage

CAPTURES_PER_THREAD = 4  # the window: captures submitted or waiting to be written, per worker thread
FETCH_CHECK_S = 2.0  # while a chunk of records is fetched, how often to check that its worker is still there


class ClusterAnalysis(Analysis):
    """A run of `iotscan analyze` whose captures are analysed by the workers of a Dask cluster."""

    def __init__(self, client: Any, sink: Sink, stages: list[Stage], *, build_stages: Any,
                 reporter: Reporter | None = None, fail_on: str | None = None, attacks_only: bool = False,
                 ordered: bool = False, remote: bool = False, direct_reads: bool = True) -> None:
        super().__init__(sink, stages=stages, reporter=reporter, fail_on=fail_on, attacks_only=attacks_only)
        self.client = client
        self.build_stages = build_stages  # the workers' stages: built there, the same as ``stages``
        self.ordered = ordered
        self.remote = remote  # workers on other machines: they cannot read what this process copied (stdin)
        self.direct_reads = direct_reads  # spool files on this machine are read from disk, not through Dask
        self._wake = threading.Event()
        self._by_input: dict[str, list[tuple[int, dict[str, Any]]]] = {"warnings": [], "errors": [], "inputs": []}
        self._workers: dict[str, dict[str, float]] = {}
        self._merger = _InputOrder(self.stages)
        self._live: dict[int, tuple[int, int, int]] = {}  # index -> bytes, flows, attacks of a running capture
        self._done = {"captures": 0, "bytes": 0}
        self._listed, self._listing_done = 0, False
        self._raw_lines = getattr(sink, "write_lines", None)  # NDJSON out: the workers' lines as they are

    # -- the run -----------------------------------------------------------------------------------

    def stop(self) -> None:
        super().stop()
        self._wake.set()

    def run_files(self, paths: Iterable[str | os.PathLike[str]], config: MeterConfig) -> RunState:
        token = uuid.uuid4().hex
        cards = tuple((getattr(stage, "card", None) or {}).get("sha256") for stage in self.stages)
        spec = RunSpec(token=token, config=config, build_stages=self.build_stages, stage_cards=cards,
                       fail_on=self.fail_on, attacks_only=self.attacks_only, emit_flows=self.emit_flows)
        with self.reporter.progress() as progress, interruptible(self):
            progress.track(self._poll)
            topic = progress_topic(token)
            self.client.subscribe_topic(topic, self._progress_event)
            try:
                # a task's result rather than scattered data: the scheduler makes it again if its worker dies
                shared = self.client.submit(run_spec, spec, key=f"iotscan-{token}-spec", pure=False)
                _Dispatch(self, shared, token).run(paths)
            finally:
                self.client.unsubscribe_topic(topic)
                with contextlib.suppress(Exception):  # a cluster going away takes its spool files with it
                    self.client.run(remove_spools, token)
                    self.client.set_metadata(["iotscan", token], None)
        return self.state

    def inputs(self, paths: Iterable[str | os.PathLike[str]]) -> Iterator[str | CaptureFile | InputProblem]:
        """What each worker is given: the paths and URLs as the user gave them (directories listed here); stdin
        copied here first, for workers of this machine."""
        for item in listed(paths):
            if item != STDIN:
                yield item
            elif self.remote:
                yield InputProblem(STDIN, "stdin is read by this process, not by the workers of a remote cluster: "
                                          "save it to a file they can read")
            else:
                yield capture_file(STDIN)

    # -- one capture's outcome ---------------------------------------------------------------------

    def take(self, outcome: CaptureOutcome) -> None:
        """Write a capture's records, count it, and say its errors and warnings. Raises _RecordsLost (before any
        record is written) when its worker went away with them."""
        if outcome.fatal is not None:
            message, code = outcome.fatal
            raise IotscanError(message, ExitCode(code))
        if outcome.records:
            self._write_lines(outcome.records)
        elif outcome.spool is not None:
            self._write_spool(outcome.spool)
        state, index = outcome.state, outcome.index
        self.state.packets += state.packets
        self.state.flows += state.flows
        self.state.attacks += state.attacks
        self.state.attack_families.update(state.attack_families)
        self.state.fail_hits += state.fail_hits
        self.state.folded_flows += state.folded_flows
        self.state.floods += state.floods
        self.state.records.update(state.records)
        self.state.exit_code = max(self.state.exit_code, state.exit_code)
        for kind, entries in (("warnings", state.warnings), ("errors", state.errors), ("inputs", state.inputs)):
            self._by_input[kind].extend((index, entry) for entry in entries)
        for entry in state.errors:
            error(f"{entry['source']}: {entry['message']}")
        for entry in state.warnings:
            self.reporter.warn(f"{entry['source']}: {entry['message']}")
        self._merger.add(index, outcome.results)
        self._live.pop(index, None)
        self._done["captures"] += 1
        self._done["bytes"] += outcome.size
        if outcome.worker and outcome.state.inputs:
            done = self._workers.setdefault(outcome.worker, {"captures": 0, "packets": 0, "flows": 0, "bytes": 0,
                                                             "busy_s": 0.0})
            done["captures"] += 1
            done["packets"] += state.packets
            done["flows"] += state.flows
            done["bytes"] += outcome.size
            done["busy_s"] += outcome.seconds

    def _write_lines(self, lines: bytes) -> None:
        if self._raw_lines is not None:
            self._raw_lines(lines)
            return
        write = self.sink.write
        for line in lines.splitlines():
            write(orjson.loads(line))

    def _write_spool(self, ref: SpoolRef) -> None:
        local = self._on_this_machine(ref)
        path = Path(ref.path) if local else self._fetch(ref)
        try:
            with path.open("rb") as f:
                rest = b""
                for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
                    chunk = rest + chunk
                    cut = chunk.rfind(b"\n") + 1
                    self._write_lines(chunk[:cut])
                    rest = chunk[cut:]
                if rest:
                    self._write_lines(rest)
        finally:
            path.unlink(missing_ok=True)

    def _on_this_machine(self, ref: SpoolRef) -> bool:
        if not self.direct_reads or ref.host != socket.gethostname():
            return False
        try:
            found = os.stat(ref.path)
        except OSError:
            return False
        return (found.st_dev, found.st_ino) == (ref.device, ref.inode)

    def _fetch(self, ref: SpoolRef) -> Path:
        """A spool file of another machine's worker, copied here a chunk at a time (complete before any of its
        records is written: a worker lost meanwhile means the capture is analysed again, never half written)."""
        fd, tmp = tempfile.mkstemp(prefix="iotscan-records-", suffix=".ndjson")
        path = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                offset = 0
                while offset < ref.size:
                    last = offset + CHUNK_BYTES >= ref.size
                    data = self._fetch_chunk(ref, offset, last)
                    if not data:
                        raise _RecordsLost(f"its records on {ref.worker} ended early")
                    out.write(data)
                    offset += len(data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def _fetch_chunk(self, ref: SpoolRef, offset: int, last: bool) -> bytes:
        future = self.client.submit(read_spool, ref.path, offset, CHUNK_BYTES, last, workers=[ref.worker],
                                    allow_other_workers=False, pure=False)
        try:
            while True:
                try:
                    return future.result(timeout=FETCH_CHECK_S)
                except TimeoutError:
                    if ref.worker not in self.client.nthreads():
                        raise _RecordsLost(f"worker {ref.worker} went away with its records") from None
                except OSError as exc:
                    raise _RecordsLost(f"its records on {ref.worker} could not be read: {exc}") from exc
        finally:
            future.release()

    # -- progress and the end ----------------------------------------------------------------------

    def _progress_event(self, event: tuple[float, list[int]]) -> None:
        """From a worker, about a running capture (worker._Watcher): in the client's event loop thread."""
        index, done, flows, attacks = event[1]
        self._live[index] = (done, flows, attacks)

    def _poll(self) -> tuple[str, int | None, int, str]:
        live = list(self._live.values())
        done = self._done["bytes"] + sum(v[0] for v in live)
        flows = self.state.flows + sum(v[1] for v in live)
        attacks = self.state.attacks + sum(v[2] for v in live)
        listed = f"{self._listed:,}" + ("" if self._listing_done else "+")
        elapsed = max(time.monotonic() - self.state.started, 1e-6)
        return (f"captures {self._done['captures']:,}/{listed}", None, done,
                f"{flows:,} flows  {attacks:,} attacks  {flows / elapsed:,.0f} flows/s  {len(live)} running")

    def finish(self) -> dict[str, Any]:
        # captures in input order, whatever order they ended in: as a single process lists them
        for kind, entries in self._by_input.items():
            entries.sort(key=lambda entry: entry[0])
            setattr(self.state, kind, [entry for _, entry in entries] + getattr(self.state, kind))
            entries.clear()
        self._merger.close()
        return super().finish()

    def summarize(self, summary: dict[str, Any]) -> None:
        summary["workers"] = [
            {"worker": address, **{k: (round(v, 3) if k == "busy_s" else int(v)) for k, v in done.items()},
             "packets_per_s": round(done["packets"] / done["busy_s"], 1) if done["busy_s"] else 0.0}
            for address, done in sorted(self._workers.items())]


class _RecordsLost(Exception):
    """A worker went away with the records of a capture it had analysed: the capture is analysed again."""


class _Dispatch:
    """One run's traffic with the cluster: inputs submitted a window at a time, outcomes taken as they end."""

    def __init__(self, analysis: ClusterAnalysis, spec: Any, token: str) -> None:
        from distributed import as_completed

        self.analysis, self.spec, self.token = analysis, spec, token
        self.client = analysis.client
        self.running = as_completed()
        self.pending: dict[Any, int] = {}  # future -> input index
        self.items: dict[int, str | CaptureFile] = {}  # what each submitted capture is
        self.waiting: dict[int, Any] = {}  # --ordered: done, after a capture not yet done
        self.next_index = 0
        self.again: set[int] = set()  # captures analysed again (their records were lost with their worker)
        threads = sum(self.client.nthreads().values()) or 1
        self.window = max(4, CAPTURES_PER_THREAD * threads)

    def run(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        analysis = self.analysis
        inputs = enumerate(analysis.inputs(paths))
        more = True
        try:
            while not analysis.state.interrupted:
                while more and len(self.pending) + len(self.waiting) < self.window:
                    index, item = next(inputs, (-1, None))
                    if item is None:
                        more, analysis._listing_done = False, True
                        break
                    analysis._listed += 1
                    if isinstance(item, InputProblem):
                        outcome = CaptureOutcome(index=index, name=item.path)
                        outcome.state.error(item.path, item.message)
                        self._ready(index, outcome)
                    else:
                        self.items[index] = item
                        self._submit(index, str(index))
                if not self.pending and not more:
                    break
                if not self.running.has_ready():
                    analysis._wake.wait(0.1)
                    continue
                future = next(self.running)
                self._ready(self.pending.pop(future), future)
        finally:
            self._cancel()

    def _submit(self, index: int, attempt: str) -> None:
        future = self.client.submit(analyze_capture, self.spec, index, self.items[index], attempt,
                                    key=f"iotscan-{self.token}-{attempt}", pure=False)
        self.pending[future] = index
        self.running.add(future)

    def _ready(self, index: int, done: Any) -> None:
        """A capture is done (a future, or the outcome of an input that could not be used): taken now, or in input
        order with --ordered."""
        if not self.analysis.ordered:
            self._take(index, done)
            return
        self.waiting[index] = done
        while self.next_index in self.waiting:
            if not self._take(self.next_index, self.waiting.pop(self.next_index)):
                return  # analysed again: its turn comes when that ends
            self.next_index += 1

    def _take(self, index: int, done: Any) -> bool:
        """Take a capture's outcome; False when it is being analysed again instead."""
        outcome = done if isinstance(done, CaptureOutcome) else self._outcome(index, done)
        if outcome is None:  # cancelled
            return True
        try:
            self.analysis.take(outcome)
        except _RecordsLost as lost:
            if index not in self.again:
                self.again.add(index)
                self._submit(index, f"{index}-again")
                return False
            outcome = CaptureOutcome(index=index, name=outcome.name)
            outcome.state.error(outcome.name, f"{lost} (twice)", ExitCode.CAPTURE)
            self.analysis.take(outcome)
        item = self.items.pop(index, None)
        if isinstance(item, CaptureFile) and item.spooled:  # stdin's copy: the worker removed it, unless it failed
            item.path.unlink(missing_ok=True)
        return True

    def _outcome(self, index: int, future: Any) -> CaptureOutcome | None:
        from distributed import KilledWorker
        from distributed.client import FutureCancelledError

        try:
            return future.result()
        except KilledWorker as exc:  # the cluster's own limit on workers dying (distributed.scheduler.allowed-failures)
            reason = f"the workers analysing it died: {exc}"
        except FutureCancelledError as exc:  # not by this client: the cluster lost it
            reason = f"the cluster dropped it: {exc}"
        finally:
            future.release()
        item = self.items[index]
        name = item.display_name if isinstance(item, CaptureFile) else display_name(item)
        outcome = CaptureOutcome(index=index, name=name)
        outcome.state.error(name, " ".join(reason.split()), ExitCode.CAPTURE)
        return outcome

    def _cancel(self) -> None:
        """Ctrl-C or an error: captures not taken are dropped (a running one stops: worker._Watcher)."""
        if self.pending:
            with contextlib.suppress(Exception):
                self.client.cancel(list(self.pending))
        for item in self.items.values():
            if isinstance(item, CaptureFile) and item.spooled:
                item.path.unlink(missing_ok=True)


class _InputOrder:
    """The stages' results of each capture merged in input order (as a single process merges them), whatever
    order the captures end in: those that end before an earlier one wait pickled in a temporary file."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.next = 0
        self.waiting: dict[int, tuple[int, int] | None] = {}  # index -> (offset, length) in the file
        self._file: IO[bytes] | None = None

    def add(self, index: int, results: list[Any] | None) -> None:
        if index != self.next:
            if results is None:
                self.waiting[index] = None
                return
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="iotscan-merge-")  # noqa: SIM115 - closed by close()
            data = pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL)
            offset = self._file.seek(0, os.SEEK_END)
            self._file.write(data)
            self.waiting[index] = (offset, len(data))
            return
        self._merge(results)
        self.next += 1
        while self.next in self.waiting:
            self._merge(self._load(self.waiting.pop(self.next)))
            self.next += 1
        if not self.waiting and self._file is not None:
            self._file.seek(0)
            self._file.truncate()

    def _load(self, where: tuple[int, int] | None) -> list[Any] | None:
        if where is None or self._file is None:
            return None
        self._file.seek(where[0])
        return pickle.loads(self._file.read(where[1]))  # written by this process

    def _merge(self, results: list[Any] | None) -> None:
        if results is not None:
            for stage, result in zip(self.stages, results, strict=True):
                stage.add_capture_result(result)

    def close(self) -> None:
        """At the end of the run: what still waits (captures after one that Ctrl-C left out) merged in input order."""
        for index in sorted(self.waiting):
            self._merge(self._load(self.waiting.pop(index)))
        if self._file is not None:
            self._file.close()
            self._file = None
