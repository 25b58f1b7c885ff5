"""The request pass as a stage of its own: one pass per source, shared by the stages that read its findings
(scoring: signatures; risks: risk findings and the DNS census).

It passes events through and starts the pass beside the main one at the first event (the main meter runs
then, so the forks do not race). On a file the pass runs ahead of the main pass, and a stage that needs its
findings waits for it (``findings()``); on a live interface it is a second capture whose findings fill as it
goes (``live_findings``). A stage that reads the findings (ReadsRequests) and is given no shared pass makes its
own and drives it itself.
"""

from __future__ import annotations

from iotscan.capture.side_pass import SidePass
from iotscan.detect.request_findings import MAX_FINDINGS, RequestFindings
from iotscan.detect.request_pass import request_pass
from iotscan.stage import SourceInfo, Stage


class RequestPassStage(Stage):
    def __init__(self) -> None:
        super().__init__()
        self._info: SourceInfo | None = None
        self._job: SidePass | None = None
        self._findings: RequestFindings | None = None
        self._ended = False  # the findings of this source were collected (and their warnings given)
        self.flood_rate: float | None = None  # see RequestFindings.flood_rate (the scoring stage sets it)

    def begin(self, source: SourceInfo) -> None:
        self.abandon()
        self._info = source

    def metering(self) -> None:
        self.start()

    def start(self) -> None:
        """Start the pass of the current source, if not yet."""
        info = self._info
        if info is not None and self._job is None:
            self._job, self._findings = request_pass(info.config.source, info.config, self.flood_rate)
            self._ended = False
            self._job.start()

    @property
    def live(self) -> bool:
        return self._info is not None and self._info.config.live

    def live_findings(self) -> RequestFindings | None:
        """On a live interface, the findings as they fill (None on a file: wait for them with findings())."""
        return self._findings if self.live else None

    def running(self) -> bool:
        """Whether the pass over a file still runs (its findings are not complete)."""
        return self._job is not None and not self._ended and self._job.is_alive()

    def findings(self) -> RequestFindings | None:
        """The pass's findings once it has ended, waiting for it (on a file it reads only the few packets its
        filter lets through and runs ahead of the main pass; a live one is stopped); warnings say what went
        wrong or was forgotten. None when no pass ran or it failed."""
        job = self._job
        if job is None:
            return None
        if not self._ended:
            self._ended = True
            job.end()
            name = self._info.name if self._info is not None else ""
            if (dropped := job.dropped()) is not None:
                self.warn(name, "dropped", dropped)
            if job.error is not None:
                self.warn(name, "request_pass", f"request pass failed (no HTTP or DNS signatures): {job.error}")
                self._findings = None
                return None
            if self._findings is not None and self._findings.flood_probes:
                self.warn(name, "flood_probes", f"{self._findings.flood_probes:,} probes of flooded services "
                                                "(scanner-like SYNs, flag probes or pings at a flood's rate) were "
                                                "counted, not kept")
            if self._findings is not None and self._findings.forgotten:
                self.warn(name, "request_signatures_capped",
                          f"{self._findings.forgotten:,} of {self._findings.matched:,} flows matching request "
                          f"signatures were forgotten for newer ones (at most {MAX_FINDINGS:,} are kept)")
        return self._findings

    def abandon(self) -> None:
        """A pass still running belongs to a source that ended or failed: stop it, do not wait."""
        if self._job is not None:
            self._job.stop()
            self._job = self._findings = None

    def end(self, source: SourceInfo) -> None:
        self.abandon()

    def finish(self) -> list:
        self.abandon()  # the last source failed before its end
        return []


class ReadsRequests(Stage):
    """A stage that reads the request pass's findings: from the pipeline's RequestPassStage (an earlier stage,
    shared), or from a pass of its own that it drives itself through its hooks."""

    def __init__(self, requests: RequestPassStage | None = None) -> None:
        super().__init__()
        self.requests = requests or RequestPassStage()
        self._own_requests = requests is None

    def begin(self, source: SourceInfo) -> None:
        if self._own_requests:
            self.requests.begin(source)

    def metering(self) -> None:
        self.requests.start()  # a shared pass has started already (its stage comes first): then nothing

    def end(self, source: SourceInfo) -> None:
        if self._own_requests:
            self.requests.end(source)

    def finish(self) -> list:
        if self._own_requests:
            self.requests.finish()
        return []

    def summarize(self, summary: dict) -> None:
        super().summarize(summary)
        if self._own_requests:
            self.requests.summarize(summary)
