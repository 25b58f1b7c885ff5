"""The analysis core: inputs -> source -> enrichment and scoring stages -> sink, one pass, streaming.

A stage sees each source begin and end, transforms the stream of (record, flow) pairs lazily, and
may add records of its own at the end of the run (device records, before the summary).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from iotscan.capture.inputs import (
    STDIN,
    CaptureFile,
    CopyInterrupted,
    InputProblem,
    copy_in_progress,
    expand,
    link_type_name,
)
from iotscan.capture.source import ACTIVE, EMBRYO_SHARE, PACKETS, FlowSource, MeterConfig, SourceReport
from iotscan.errors import CaptureError, ExitCode, InputError
from iotscan.output.console import ProgressView, Reporter, bytes_read_by, error
from iotscan.output.records import RISK_SEVERITIES, flow_record, summary_record
from iotscan.output.sinks import Sink
from iotscan.stage import TICK, Event, SourceInfo, Stage

GC_EVERY_EVENTS = 1 << 16


def _announcing(flows: Iterator[Any], stages: Sequence[Stage]) -> Iterator[Any]:
    """The meter's flows; the first one tells every stage that the meter runs (Stage.metering)."""
    for flow in flows:
        for stage in stages:
            stage.metering()
        yield flow
        break
    yield from flows


def _gc_paced(events: Iterator[Any], every: int = GC_EVERY_EVENTS) -> Iterator[Any]:
    """The events, with Python's cyclic garbage collector paced by events instead of allocations.

    Every flow allocates many short-lived containers, so the default collector runs every few flows,
    and its full collections walk every live object (the libraries, the models, the stages' state):
    15% of analyze's time on the benchmark capture, to free a few thousand cyclic objects per 100,000
    flows. So it is off while events stream and collects fully every ``every`` events, which bounds
    what garbage cycles can hold. Processes forked meanwhile (the meters) get the default back.
    """
    global _gc_paused
    enabled = gc.isenabled()
    count = 0
    try:
        for event in events:
            if count == 0 and enabled:
                gc.disable()
                _gc_paused = True
            count += 1
            if count % every == 0:
                gc.collect()
            yield event
    finally:
        if enabled:
            _gc_paused = False
            gc.enable()


_gc_paused = False


def _gc_in_child() -> None:
    if _gc_paused:
        gc.enable()


os.register_at_fork(after_in_child=_gc_in_child)


@dataclass
class RunState:
    """Counts for the summary record, filled as the run goes."""

    started: float = field(default_factory=time.monotonic)
    packets: int = 0
    flows: int = 0
    attacks: int = 0
    attack_families: Counter[str] = field(default_factory=Counter)
    folded_flows: int = 0  # into flood records
    floods: int = 0
    warnings: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    exit_code: ExitCode = ExitCode.OK
    interrupted: bool = False
    fail_hits: int = 0
    records: Counter[str] = field(default_factory=Counter)  # stages' own records written, by event_type

    def error(self, source: str, message: str, code: ExitCode = ExitCode.USAGE) -> None:
        self.errors.append({"source": source, "message": message})
        self.exit_code = max(self.exit_code, code)

    def warn(self, source: str, code: str, message: str) -> None:
        self.warnings.append({"source": source, "code": code, "message": message})


class Analysis:
    """One run of iotscan over sources, writing records to a sink."""

    def __init__(self, sink: Sink, stages: Sequence[Stage] = (), reporter: Reporter | None = None,
                 fail_on: str | None = None, emit_flows: bool = True, attacks_only: bool = False) -> None:
        self.sink = sink
        self.stages = list(stages)
        self.reporter = reporter or Reporter(quiet=True)
        self.fail_on = fail_on
        self.emit_flows = emit_flows
        self.attacks_only = attacks_only  # write only the flow records judged attacks (--attacks-only)
        self.state = RunState()
        self.live = False  # capturing an interface: a stop is how the run ends, not an interruption
        self._current: FlowSource | None = None

    # -- sources ---------------------------------------------------------------------------------

    def run_files(self, paths: Iterable[str | os.PathLike[str]], config: MeterConfig) -> RunState:
        """Analyse capture files and directories; a bad input is reported and the others still run."""
        with self.reporter.progress() as progress, interruptible(self):
            def copying(name: str, copied: Callable[[], int]) -> None:  # stdin, a pipe, a compressed capture
                label = f"copying {'stdin' if name == STDIN else _short_label(name)}"
                progress.track(lambda: (label, None, copied(), ""))

            for item in expand(paths, on_copy=copying):
                if not self.run_item(item, config, progress):
                    break
        return self.state

    def run_item(self, item: CaptureFile | InputProblem, config: MeterConfig, progress: ProgressView | None = None
                 ) -> bool:
        """Analyse one capture of run_files (or report the problem with it); False when no further input is to
        start (Ctrl-C). Also what a worker of iotscan.cluster runs for each capture it is given."""
        cut = isinstance(item, CaptureFile) and item.cut
        if self.state.interrupted and not cut:  # Ctrl-C, perhaps while a compressed file was copied
            if isinstance(item, CaptureFile) and item.spooled:
                item.path.unlink(missing_ok=True)
            return False
        if isinstance(item, InputProblem):
            self._fail(item.path, item.message)
            return True
        info = SourceInfo(name=item.display_name, config=replace(config, source=str(item.path)), capture=item)
        for lt in item.unsupported_link_types:
            self.state.warn(info.name, "link_type",
                            f"packets with unsupported link type {link_type_name(lt)} are skipped")
        if item.warning:
            self._warn(info.name, "truncated", item.warning)
        if cut:  # the Ctrl-C ended the stream, not its analysis: all that came is analysed
            self._warn(info.name, "interrupted", f"Ctrl-C ended the input after {item.size:,} bytes: "
                       "the flows of what came before are reported")
            self.state.interrupted = False
        if progress is not None:
            progress.track(self._file_poller(info))
        try:
            self.run_source(info)
        finally:
            if item.spooled:  # the temporary copy of stdin, a pipe or a compressed file
                item.path.unlink(missing_ok=True)
        if item.warning and self.state.inputs[-1]["status"] == "ok":
            self.state.inputs[-1]["status"] = "truncated"
        if progress is not None:
            progress.track(None)
        if cut:  # no further input starts (exit 130, the results are partial)
            self.state.interrupted = True
            if self.state.inputs[-1]["status"] == "ok":
                self.state.inputs[-1]["status"] = "interrupted"
            return False
        return True

    @property
    def current_source(self) -> FlowSource | None:
        """The source being metered now (None between sources), for views that poll its counters."""
        return self._current

    def run_interface(self, info: SourceInfo) -> RunState:
        """Capture one interface until stop() (Ctrl-C, SIGTERM, or a limit the caller enforces).

        Stopping is how a live capture ends: the meter flushes its active flows through the
        stages, and the run keeps exit code 0.
        """
        self.live = True
        with interruptible(self):
            self.run_source(info)
        return self.state

    def run_source(self, info: SourceInfo) -> None:
        """Meter one source through the stages into the sink."""
        source = FlowSource(info.config, heartbeat=info.config.live)
        info.meter = source
        self._current = source
        if self.state.interrupted:  # stop() came before the source started
            source.stop()
        for stage in self.stages:
            stage.begin(info)
        status = "ok"
        try:
            self._drain(source, info)
        except (InputError, CaptureError) as exc:  # this source is lost; the others still run
            # the meter names the file it read: the name given, or its copy (stdin, a compressed capture)
            self._fail(info.name, _strip_source(exc.message, info.config.source), exc.exit_code)
            status = "error"
        finally:
            self._current = None
        report = source.report
        if status == "ok":
            status = self._report_warnings(info, report)
            for stage in self.stages:
                stage.end(info)
        self.state.packets += report.packets + report.ignored_packets
        self.state.inputs.append({"source": info.name, "packets": report.packets + report.ignored_packets,
                                  "flows": report.flows, "status": status})
        self.capture_ended([stage.capture_result() for stage in self.stages])

    def capture_ended(self, results: list[Any]) -> None:
        """The stages' results of the capture that ended (Stage.capture_result), one per stage: merged into the
        run's here; a worker of iotscan.cluster sends them to its client instead."""
        for stage, result in zip(self.stages, results, strict=True):
            stage.add_capture_result(result)

    def _drain(self, source: FlowSource, info: SourceInfo) -> None:
        name = info.name
        base = os.path.basename(name)
        paced = _gc_paced(source)
        claiming = [stage.claims for stage in self.stages if type(stage).claims is not Stage.claims]
        events: Iterator[Event]
        if claiming:  # a flow a stage claims is made no record (a flood's: see Stage.claims)
            claims = claiming[0]
            events = (TICK if f is None else (None, f) if claims(f) else (flow_record(f, name, base), f)
                      for f in _announcing(paced, self.stages))
        else:
            events = (TICK if f is None else (flow_record(f, name, base), f) for f in _announcing(paced, self.stages))
        for stage in self.stages:
            events = stage.run(events)
        try:
            self._write(events)
        finally:
            # A stage's failure leaves the chain unclosed while its traceback lives: the meter would capture
            # on (or block on its full queue, and the exit wait for it) and the collector stay paused.
            source.close()
            paced.close()

    def _write(self, events: Iterator[Event]) -> None:
        write = self.sink.write
        fail_family = self.fail_on
        fails_on_risks = risk_test(self.fail_on)
        emit_all, emit_attacks = self.emit_flows and not self.attacks_only, self.emit_flows
        for record, flow in events:
            if record is None:
                continue
            if flow is None:  # a stage's own record: an alert, a flood (written where the flows it folds would be)
                if record["event_type"] == "flood":
                    self._count_folded(record)
                    if not emit_attacks:
                        continue
                else:
                    self.state.records[record.get("event_type", "")] += 1
                    family = record.get("family")  # an anomaly or a new device is no attack: it has no family
                    if (fail_family == "attack" and family) or \
                            (fail_family is not None and fail_family in (family, record.get("kind"))):
                        self.state.fail_hits += 1
                write(record)
                continue
            self.state.flows += 1
            if fails_on_risks is not None and record.get("risks") and fails_on_risks(record["risks"]):
                self.state.fail_hits += 1
            if record.get("verdict") == "attack":
                self.state.attacks += 1
                family = record.get("family")
                self.state.attack_families[family or "unknown"] += 1
                if fail_family in ("attack", family):
                    self.state.fail_hits += 1
                if emit_attacks:
                    write(record)
            elif emit_all:
                write(record)

    def _count_folded(self, record: dict[str, Any]) -> None:
        """A flood record's flows count as flows and attacks, as their flow records would have."""
        state, flows, family = self.state, record["flows"], record["family"]
        state.flows += flows
        state.folded_flows += flows
        state.floods += 1
        state.attacks += flows
        state.attack_families[family] += flows
        if self.fail_on in ("attack", family):
            state.fail_hits += flows

    def _report_warnings(self, info: SourceInfo, report: SourceReport) -> str:
        status = "ok"
        if report.read_error:
            status = "truncated"
            self._warn(info.name, "truncated",
                       f"capture is truncated or damaged after {report.packets + report.ignored_packets:,} "
                       "packets; flows up to the damage are reported")
        if report.evicted_flows:
            self._warn(info.name, "flow_cap",
                       f"flow table cap of {info.config.max_flows:,} reached: {report.evicted_flows:,} flows "
                       "were expired early (they may be split in several records)")
        if report.emergency_flows:
            self._warn(info.name, "flow_emergency",
                       f"more one- and two-packet flows at once than a quarter of the flow table cap "
                       f"({info.config.max_flows // EMBRYO_SHARE:,}, a flood?): {report.emergency_flows:,} of them "
                       "were expired early")
        if report.stopped:
            status = "stopped" if self.live else "interrupted"
        for message in report.warnings:
            self._warn(info.name, "capture", message)
        if report.dropped_packets:
            self._warn(info.name, "dropped", f"the kernel dropped {report.dropped_packets:,} packets: "
                       "the flows they belonged to are incomplete")
        if report.unread_packets:
            self._warn(info.name, "unread", f"{report.unread_packets:,} packets that arrived before the stop were "
                       "still in the kernel's buffer when metering them took too long: not metered")
        if report.ignored_packets and not report.packets:
            self._warn(info.name, "no_ip", f"none of the {report.ignored_packets:,} packets is IP: no flows")
        return status

    def _warn(self, source: str, code: str, message: str) -> None:
        self.state.warn(source, code, message)
        self.reporter.warn(f"{source}: {message}")

    def _fail(self, source: str, message: str, code: ExitCode = ExitCode.USAGE) -> None:
        """An input that cannot be analysed: in the summary, and one line on stderr, always."""
        self.state.error(source, message, code)
        error(f"{source}: {message}")

    def _file_poller(self, info: SourceInfo) -> Callable[[], tuple[str, int | None, int, str]]:
        started = time.monotonic()
        size = info.capture.size if info.capture else None
        label = _short_label(info.name)

        def poll() -> tuple[str, int | None, int, str]:
            src = self._current
            if src is None:
                return label, size, 0, ""
            elapsed = max(time.monotonic() - started, 1e-6)
            packets = src.counter(PACKETS)
            done = bytes_read_by(src.pid, info.config.source) or 0  # the file read: a copy, for stdin or a .gz
            rates = f"{packets / elapsed:,.0f} pkt/s  {self.state.flows / elapsed:,.0f} flows/s  " \
                    f"{src.counter(ACTIVE):,} active"
            return label, size, done, rates

        return poll

    # -- end of run ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ctrl-C: the current source flushes its active flows, no further sources start."""
        self.state.interrupted = True
        if self._current is not None:
            self._current.stop()

    def finish(self) -> dict[str, Any]:
        """Write the stages' own records and the summary; return the summary."""
        records = [record for stage in self.stages for record in stage.finish()]
        for stage in self.stages:
            stage.annotate(records)
        devices = 0
        for record in records:
            if record.get("event_type") == "device":
                devices += 1
            self.sink.write(record)
        if self.state.interrupted and not self.live:
            self.state.warn("", "interrupted", "interrupted by the user: results are partial")
        elapsed = time.monotonic() - self.state.started
        summary = summary_record(
            packets=self.state.packets, flows=self.state.flows, devices=devices, attacks=self.state.attacks,
            attack_families=dict(self.state.attack_families.most_common()), folded_flows=self.state.folded_flows,
            floods=self.state.floods,
            elapsed_s=round(elapsed, 3), packets_per_s=round(self.state.packets / elapsed, 1) if elapsed else 0.0,
            warnings=self.state.warnings, errors=self.state.errors, inputs=self.state.inputs)
        for stage in self.stages:
            stage.summarize(summary)
        self.summarize(summary)
        self.sink.close(summary)
        return summary

    def summarize(self, summary: dict[str, Any]) -> None:
        """Add to the summary what this kind of run knows besides the stages (iotscan.cluster: its workers)."""

    def exit_code(self) -> ExitCode:
        if self.state.interrupted and not self.live:
            return ExitCode.INTERRUPTED
        if self.state.exit_code != ExitCode.OK:
            return self.state.exit_code
        if self.state.fail_hits:
            return ExitCode.FINDINGS
        return ExitCode.OK


def risk_test(fail_on: str | None) -> Callable[[list[dict[str, Any]]], bool] | None:
    """What `--fail-on risk:LEVEL` (a severity: that one or worse), `--fail-on risk:ID` (one risk of the catalogue)
    or `--fail-on risk` (any) fails on, as a test of a flow record's risks; None for other values."""
    if fail_on is None or not (fail_on == "risk" or fail_on.startswith("risk:")):
        return None
    target = fail_on.partition(":")[2] or RISK_SEVERITIES[0]
    if target in RISK_SEVERITIES:
        worst = set(RISK_SEVERITIES[RISK_SEVERITIES.index(target):])
        return lambda risks: any(r["severity"] in worst for r in risks)
    return lambda risks: any(r["risk"] == target for r in risks)


def _short_label(name: str) -> str:
    """A capture's name for the progress bar: its file name, at most 40 characters."""
    label = os.path.basename(name)
    return label if len(label) <= 40 else label[:37] + "..."


def _strip_source(message: str, source: str) -> str:
    prefix = f"{source}: "
    return message[len(prefix):] if message.startswith(prefix) else message


class interruptible:
    """Route SIGINT and SIGTERM to Analysis.stop() so active flows are flushed and a summary written."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # ValueError: not the main thread
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.analysis.state.interrupted:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.analysis.stop()
        if copy_in_progress():  # stdin or a pipe being copied ends here, a compressed file's copy stops
            raise CopyInterrupted

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
