"""The risk catalogue: what iotscan calls a weak spot, how bad it is, what to do about it, and which of nDPI's
flow risks it is read from. Risks are data (iotscan/data/risks.json); this module loads and checks them.

nDPI's risks are named as in its ``ndpi_risk_enum`` and turned into bit numbers with the enum of the nDPI
inside NFStream's engine, so a risk nDPI renumbers or drops is matched by name or not at all (a name this
nDPI does not know is left out, not guessed).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from iotscan.output.records import RISK_SEVERITIES

SIDES = ("src", "dst", "both")


@dataclass(frozen=True)
class Software:
    """A product of the outdated-software table: its version pattern (group 1: the version, absent when the
    product is outdated whatever its version) and the version it must be at least."""

    name: str
    pattern: re.Pattern[str]
    older_than: tuple[int, ...] | None  # None: every version is outdated
    why: str


@dataclass(frozen=True)
class Risk:
    id: str
    severity: str
    title: str
    explanation: str
    fix: str
    ndpi: tuple[tuple[str, str, bool], ...] = ()  # (nDPI risk name, side, inferred from the application alone)
    rule: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """0 for low up to 3 for critical (RISK_SEVERITIES' order)."""
        return RISK_SEVERITIES.index(self.severity)


@dataclass(frozen=True)
class Catalogue:
    risks: dict[str, Risk]
    score: dict[str, Any]
    ndpi_bits: dict[int, tuple[str, str, str, bool]]  # nDPI risk bit -> (risk id, side, nDPI's name, from_application)
    software: tuple[Software, ...]

    def __getitem__(self, risk_id: str) -> Risk:
        return self.risks[risk_id]

    def by_rule(self, rule: str) -> list[Risk]:
        return [r for r in self.risks.values() if r.rule == rule]


def catalogue_path() -> Path:
    try:
        return Path(str(resources.files("iotscan.data"))) / "risks.json"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "data" / "risks.json"


def version_tuple(text: str) -> tuple[int, ...]:
    """"2.4.10" -> (2, 4, 10); "1.0.2k" -> (1, 0, 2): the leading digits of each dotted part."""
    out = []
    for part in text.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        out.append(int(digits.group()))
    return tuple(out)


def ndpi_risk_numbers() -> dict[str, int]:
    """nDPI's ndpi_risk_enum of the engine NFStream runs: name -> bit number."""
    from nfstream.engine import create_engine

    ffi, _ = create_engine()
    return {name: value for value, name in ffi.typeof("ndpi_risk_enum").elements.items()}


def parse_catalogue(data: dict[str, Any], ndpi_numbers: dict[str, int]) -> Catalogue:
    """The catalogue of a risks.json document; ValueError names what is wrong."""
    risks: dict[str, Risk] = {}
    bits: dict[int, tuple[str, str, str, bool]] = {}
    for item in data["risks"]:
        risk_id = item["id"]
        if risk_id in risks or not re.fullmatch(r"[a-z][a-z0-9_]*", risk_id):
            raise ValueError(f"risk catalogue: duplicate or malformed id {risk_id!r}")
        if item["severity"] not in RISK_SEVERITIES:
            raise ValueError(f"risk catalogue: {risk_id}: severity {item['severity']!r} is not one of "
                             f"{', '.join(RISK_SEVERITIES)}")
        for key in ("title", "explanation", "fix"):
            if not item.get(key):
                raise ValueError(f"risk catalogue: {risk_id}: no {key}")
        ndpi = tuple((n["risk"], n.get("side", "both"), bool(n.get("from_application"))) for n in item.get("ndpi", ()))
        for name, side, from_application in ndpi:
            if side not in SIDES:
                raise ValueError(f"risk catalogue: {risk_id}: side {side!r} is not one of {', '.join(SIDES)}")
            if name in ndpi_numbers:  # a risk this nDPI does not have is not read
                bits[ndpi_numbers[name]] = (risk_id, side, name, from_application)
        if not ndpi and not item.get("rule"):
            raise ValueError(f"risk catalogue: {risk_id}: neither nDPI risks nor a rule")
        risks[risk_id] = Risk(risk_id, item["severity"], item["title"], item["explanation"], item["fix"], ndpi,
                              item.get("rule"), item.get("params") or {})
    software = tuple(
        Software(s["name"], re.compile(s["pattern"], re.IGNORECASE),
                 version_tuple(s["older_than"]) if s.get("older_than") else None, s["why"])
        for r in risks.values() for s in r.params.get("software", ()))
    score = data["score"]
    if set(score["severity"]) != set(RISK_SEVERITIES):
        raise ValueError("risk catalogue: score.severity must weigh every severity")
    return Catalogue(risks, score, bits, software)


@functools.cache
def load_catalogue() -> Catalogue:
    """The bundled catalogue (loaded once; a broken file is a broken install)."""
    return parse_catalogue(json.loads(catalogue_path().read_text()), ndpi_risk_numbers())
