"""The risk stage: a ``risks`` list on every flow record, the device records' risk posture, the summary's count
of flows per risk.

It reads each flow's nDPI facts (the main pass's meter reads them when told: MeterConfig.ndpi_facts) and the
request pass's findings (shared with scoring: RequestPassStage). On a file the pass runs ahead of the main
one: the first flows wait for it (up to HELD_FOR_REQUESTS, then the reader waits too), as they do for
scoring. On a live interface the findings fill as the second capture reads. Device risks are the flows'
risks counted for the local device(s) on the side the risk belongs to (the DeviceStage, before this one,
names them in src_device and dst_device); ``annotate`` adds them to the device records at the end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from iotscan.detect.posture import DevicePostures, RiskTally
from iotscan.detect.request_findings import RequestFindings
from iotscan.detect.request_stage import ReadsRequests, RequestPassStage
from iotscan.detect.risk_catalogue import load_catalogue
from iotscan.detect.risks import FlowRisks, is_public
from iotscan.detect.scoring import HELD_FOR_REQUESTS
from iotscan.stage import Event, SourceInfo

_SIDES = {"src": ("src_device",), "dst": ("dst_device",), "both": ("src_device", "dst_device")}


class RiskStage(ReadsRequests):
    def __init__(self, requests: RequestPassStage | None = None) -> None:
        super().__init__(requests)
        self.catalogue = load_catalogue()
        self.judge = FlowRisks(self.catalogue)
        self.postures = DevicePostures(self.catalogue)
        self.counts: Counter[str] = Counter()
        self._severity = {r.id: r.severity for r in self.catalogue.risks.values()}
        self._rank = {r.id: r.rank for r in self.catalogue.risks.values()}
        self._findings: RequestFindings | None = None

    def begin(self, source: SourceInfo) -> None:
        if not source.config.ndpi_facts and source.config.n_dissections:
            raise ValueError("the risk stage needs nDPI's facts of each flow (MeterConfig.ndpi_facts)")
        super().begin(source)
        self._findings = None

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        held: list[Event] = []
        for event in events:
            if event[0] is None or event[1] is None:  # a heartbeat, a claimed flow, or another stage's record
                yield event
                continue
            if self._findings is None:
                live = self.requests.live_findings()
                if live is None and self.requests.running() and len(held) < HELD_FOR_REQUESTS:
                    held.append(event)  # the pass over the file is not done: its findings are not complete
                    continue
                self._findings = live or self.requests.findings() or RequestFindings()
                yield from self._judged(held)
                held = []
            self._judge(*event)
            yield event
        if held:
            self._findings = self.requests.findings() or RequestFindings()
            yield from self._judged(held)

    def _judged(self, events: list[Event]) -> Iterator[Event]:
        for event in events:
            self._judge(*event)
            yield event

    def _judge(self, record: dict[str, Any], flow: Any) -> None:
        findings = self._findings
        assert findings is not None
        requested = findings.risks.of_flow(record["src_ip"], record["src_port"], record["dst_ip"], record["dst_port"],
                                           record["first_seen_ms"], record["last_seen_ms"]) \
            if findings.risks.by_endpoints else []
        found = self.judge.of(record, getattr(flow, "ndpi", None), requested, findings.risks.census)
        if not found:
            record["risks"] = []
            return
        found.sort(key=lambda f: -self._rank[f[0]])
        risks: list[dict[str, str]] = []
        for risk, evidence, side, detector in found:
            if not any(r["risk"] == risk for r in risks):  # one entry per risk (both sides' evidence alike)
                risks.append({"risk": risk, "severity": self._severity[risk], "evidence": evidence,
                              "detector": detector})
                self.counts[risk] += 1
            counted = None
            for link in _SIDES[side]:
                mac = record.get(link)
                if link == "dst_device" and not record["dst2src_packets"]:
                    continue  # a responder that never answered showed nothing of itself
                if mac and mac != counted:
                    other = record["dst_ip"] if link == "src_device" else record["src_ip"]
                    self.postures.add(mac, risk, record, evidence, is_public(other))
                    counted = mac
        record["risks"] = risks

    def capture_result(self) -> tuple[list[dict[str, str]], dict[str, dict[str, RiskTally]], Counter[str]]:
        """The capture's warnings, device tallies and risk counts, taken (merged into the run's:
        add_capture_result), so that a capture analysed by a worker of iotscan.cluster counts as one analysed
        here."""
        taken = (super().capture_result(), self.postures.devices, self.counts)
        self.postures.devices, self.counts = {}, Counter()
        return taken

    def add_capture_result(self, result: tuple[list[dict[str, str]], dict[str, dict[str, RiskTally]],
                                               Counter[str]]) -> None:
        warnings, devices, counts = result
        super().add_capture_result(warnings)
        self.postures.merge(devices)
        self.counts.update(counts)

    def annotate(self, records: list[dict[str, Any]]) -> None:
        self.postures.annotate(records)

    def summarize(self, summary: dict[str, Any]) -> None:
        super().summarize(summary)
        summary["risks"] = dict(self.counts.most_common())
