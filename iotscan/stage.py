"""What every stage of the pipeline shares: the event it passes on, the source it is told about, its base class.

Its own module so that the stages (detect, devices, inspect) depend on it and not on the pipeline that runs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nfstream.flow import NFlow

from iotscan.capture.inputs import CaptureFile
from iotscan.capture.source import FlowSource, MeterConfig

# A flow record and its NFStream flow; on a live interface also TICK, a heartbeat when no flow has
# come for a moment, which every stage passes on (a stage holding flows back may flush on it). Two more kinds:
# (None, flow), a flow a stage claimed before it was made a record (see Stage.claims; or a batch of them: the
# flows the meter held, records.HeldFlows), which the stages before that one pass on unread; and (record, None),
# a record a stage made of its own (a flood's, an alert), which the stages after it pass on and the pipeline
# writes as it comes.
Event = tuple[dict[str, Any], NFlow] | tuple[None, NFlow] | tuple[dict[str, Any], None] | tuple[None, None]
TICK: tuple[None, None] = (None, None)


@dataclass
class SourceInfo:
    """One capture file or interface as the stages see it."""

    name: str  # as the user wrote it (the "source" field)
    config: MeterConfig
    capture: CaptureFile | None = None  # None for a live interface
    meter: FlowSource | None = None  # its main pass's meter, when it runs here (a flood's services are held there)


class Stage:
    """Base class of enrichment and scoring stages; every hook is optional. What a stage warns of (warn())
    joins the summary's warnings."""

    def __init__(self) -> None:
        self.warnings: list[dict[str, str]] = []

    def warn(self, source: str, code: str, message: str) -> None:
        """A warning for the summary, shaped as the run's own (RunState.warn)."""
        self.warnings.append({"source": source, "code": code, "message": message})

    def begin(self, source: SourceInfo) -> None:
        pass

    def metering(self) -> None:
        """The source's main meter runs (its first flow or heartbeat came out): a stage may start its side pass now
        (the forks do not race), before the stages ahead of it let any flow through."""

    def claims(self, flow: Any) -> bool:
        """Whether this stage takes ``flow`` before a flow record is made of it: it then comes down the stages as
        (None, flow). The scoring stage claims a flood's flows, which it folds into flood records; at most one
        stage of a pipeline claims."""
        return False

    def ongoing(self) -> list[dict[str, Any]]:
        """Records this stage is still making (a flood's), for a live view: a snapshot that another thread may
        read while the stage runs."""
        return []

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        return events

    def end(self, source: SourceInfo) -> None:
        pass

    def capture_result(self) -> Any:
        """What the stage gathered over the capture that just ended (or failed) for the end of the run, taken: by
        default its warnings. The pipeline hands it to add_capture_result() at once; iotscan.cluster analyses each
        capture in a worker process and hands it (pickled) to the client's stage, captures in input order. A stage
        whose finish() or summarize() reads what it saw of the captures keeps it per capture this way."""
        taken, self.warnings = self.warnings, []
        return taken

    def add_capture_result(self, result: Any) -> None:
        """Merge what capture_result() took, for a capture analysed here or elsewhere."""
        self.warnings.extend(result)

    def finish(self) -> list[dict[str, Any]]:
        return []

    def annotate(self, records: list[dict[str, Any]]) -> None:
        """Add to the records that the stages made at the end of the run (device records), before they are
        written: by default, nothing."""

    def summarize(self, summary: dict[str, Any]) -> None:
        """Add to the summary record: by default, the stage's warnings."""
        if self.warnings:
            summary.setdefault("warnings", []).extend(self.warnings)
