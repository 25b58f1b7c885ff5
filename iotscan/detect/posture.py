"""A device's risk posture: its flows' risks gathered per risk, a score from 0 to 100 and a grade.

The score is the catalogue's simple formula (iotscan/data/risks.json, "score"; docs/risks.md):

    risk_score = 100 x (1 - product over the device's risks of (1 - severity x exposure x often))

severity weighs the risk (low 0.2, medium 0.4, high 0.7, critical 0.9), exposure is 1 when one of its flows
had a public address at its other end and 0.5 when all stayed on the local network, and often grows with
the flows that showed it (0.6 for one, 0.8 from two, 1 from ten). One critical risk facing the Internet, seen
ten times, gives 90; a low one seen once between local devices, 6. Several risks add up without passing 100.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from iotscan.detect.risk_catalogue import Catalogue

MAX_EXAMPLES = 3  # community ids and evidence kept per device and risk


@dataclass
class RiskTally:
    """One risk of one device: how often, when, how exposed, and a few examples."""

    flows: int = 0
    first_seen_ms: int = 0
    last_seen_ms: int = 0
    internet: bool = False
    community_ids: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)

    def add(self, record: dict[str, Any], evidence: str, internet: bool) -> None:
        first, last = record["first_seen_ms"], record["last_seen_ms"]
        if not self.flows or first < self.first_seen_ms:
            self.first_seen_ms = first
        self.last_seen_ms = max(self.last_seen_ms, last)
        self.flows += 1
        self.internet = self.internet or internet
        cid = record.get("community_id")
        if cid and len(self.community_ids) < MAX_EXAMPLES and cid not in self.community_ids:
            self.community_ids.append(cid)
        if len(self.evidence) < MAX_EXAMPLES and evidence not in self.evidence:
            self.evidence.append(evidence)


    def merge(self, other: RiskTally) -> None:
        """Add the tally of a later capture (iotscan.cluster: captures merged in input order)."""
        if other.flows and (not self.flows or other.first_seen_ms < self.first_seen_ms):
            self.first_seen_ms = other.first_seen_ms
        self.last_seen_ms = max(self.last_seen_ms, other.last_seen_ms)
        self.flows += other.flows
        self.internet = self.internet or other.internet
        for mine, theirs in ((self.community_ids, other.community_ids), (self.evidence, other.evidence)):
            mine.extend([x for x in theirs if x not in mine][:MAX_EXAMPLES - len(mine)])


def _step(steps: list[list[Any]], value: float) -> Any:
    """The value of the last [threshold, value] step that ``value`` reaches."""
    out = steps[0][1]
    for threshold, stepped in steps:
        if value >= threshold:
            out = stepped
    return out


def risk_points(catalogue: Catalogue, risk_id: str, tally: RiskTally) -> float:
    """severity x exposure x often of one risk of a device (0..1)."""
    score = catalogue.score
    severity = score["severity"][catalogue[risk_id].severity]
    exposure = score["exposure"]["internet" if tally.internet else "local"]
    return severity * exposure * _step(score["often"], tally.flows)


def risk_score(catalogue: Catalogue, tallies: dict[str, RiskTally]) -> int:
    remaining = 1.0
    for risk_id, tally in tallies.items():
        remaining *= 1.0 - risk_points(catalogue, risk_id, tally)
    return round(100 * (1.0 - remaining))


def risk_grade(catalogue: Catalogue, score: int) -> str:
    return _step(catalogue.score["grades"], score)


class DevicePostures:
    """Per device MAC, per risk, a RiskTally; ``annotate`` adds the posture fields to device records."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.devices: dict[str, dict[str, RiskTally]] = {}

    def add(self, mac: str, risk_id: str, record: dict[str, Any], evidence: str, internet: bool) -> None:
        tallies = self.devices.setdefault(mac, {})
        tally = tallies.get(risk_id)
        if tally is None:
            tally = tallies[risk_id] = RiskTally()
        tally.add(record, evidence, internet)

    def merge(self, devices: dict[str, dict[str, RiskTally]]) -> None:
        """Add another capture's tallies (DevicePostures.devices of a stage that saw it)."""
        for mac, tallies in devices.items():
            mine = self.devices.setdefault(mac, {})
            for risk_id, tally in tallies.items():
                if risk_id in mine:
                    mine[risk_id].merge(tally)
                else:
                    mine[risk_id] = tally

    def posture(self, mac: str) -> dict[str, Any]:
        """The device record's risk fields (records.DEVICE_RISK_FIELDS)."""
        catalogue = self.catalogue
        tallies = self.devices.get(mac, {})
        ordered = sorted(tallies.items(), key=lambda kv: (-risk_points(catalogue, *kv), kv[0]))
        risks = [{"risk": risk_id, "severity": catalogue[risk_id].severity, "title": catalogue[risk_id].title,
                  "flows": t.flows, "first_seen_ms": t.first_seen_ms, "last_seen_ms": t.last_seen_ms,
                  "internet": t.internet, "community_ids": t.community_ids, "evidence": t.evidence,
                  "fix": catalogue[risk_id].fix} for risk_id, t in ordered]
        score = risk_score(catalogue, tallies)
        return {"risks": risks, "risk_score": score, "risk_grade": risk_grade(catalogue, score)}

    def annotate(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            if record.get("event_type") == "device":
                record.update(self.posture(record["mac"]))
