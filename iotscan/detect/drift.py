"""Drift: a profile kept up to date with the traffic that raised nothing, no faster than a cap allows.

Devices change: a new firmware calls a new name of its vendor's domain, an app polls more often. On a live
interface, the flows of a profiled device whose anomaly stayed below DRIFT_BELOW (and that no other stage
judged an attack) are counted again, and every DRIFT_EVERY_MS of capture time folded into the profile:

* what the profile knew is counted up (peers, services, applications, hours, minutes);
* something new (a peer, a port with a peer, an application, a DNS domain) is admitted only when it came
  back over at least ADMIT_AFTER_MS and ADMIT_FLOWS flows, and only NEW_PER_DAY of them a day per device (a
  token bucket): a slow attacker who stays under the threshold cannot teach the profile a controller, a
  port or a protocol any faster;
* the minutes' envelope (what the density model never looks past) widens by at most WIDEN_PER_DAY a day.
"""

from __future__ import annotations

import random
from typing import Any

from iotscan.detect.profiles import merge_profiles, parse_time

DRIFT_BELOW = 0.3  # flows below this anomaly are normal enough to keep the profile current
DRIFT_EVERY_MS = 600_000  # capture time between foldings
ADMIT_AFTER_MS = 600_000  # something new must come back over 10 minutes...
ADMIT_FLOWS = 3  # ... in at least this many flows
NEW_PER_DAY = 4.0  # new things admitted per device and day at most
WIDEN_PER_DAY = 0.1  # the envelope grows by at most 10% a day


class Budget:
    """A device's token bucket of new things it may learn."""

    __slots__ = ("last_ms", "tokens")

    def __init__(self, now_ms: int) -> None:
        self.tokens = NEW_PER_DAY
        self.last_ms = now_ms

    def refill(self, now_ms: int) -> None:
        self.tokens = min(NEW_PER_DAY, self.tokens + NEW_PER_DAY * max(0, now_ms - self.last_ms) / 86_400_000)
        self.last_ms = max(self.last_ms, now_ms)

    def take(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _settled(peer: dict[str, Any]) -> bool:
    flows = sum(peer["out"].values()) + sum(peer["in"].values())
    return flows >= ADMIT_FLOWS and parse_time(peer["last_seen"]) - parse_time(peer["first_seen"]) >= ADMIT_AFTER_MS


def capped(old: dict[str, Any], new: dict[str, Any], budget: Budget) -> tuple[dict[str, Any], int]:
    """``new`` (learnt from flows that raised nothing) stripped of the new things it may not teach ``old`` yet;
    and how many new things it keeps."""
    kept = 0
    out = dict(new)
    for kind in ("remote", "local"):
        peers = {}
        for key, p in new[kind].items():
            known = old[kind].get(key)
            if known is None:
                if _settled(p) and budget.take():
                    peers[key] = p
                    kept += 1
                continue
            q = dict(p)
            for direction in ("out", "in"):
                services = {}
                for service, n in p[direction].items():
                    if service in known[direction]:
                        services[service] = n
                    elif n >= ADMIT_FLOWS and _settled(p) and budget.take():
                        services[service] = n
                        kept += 1
                q[direction] = services
            q["apps"] = {a: n for a, n in p["apps"].items() if a in known["apps"]}
            peers[key] = q
        out[kind] = peers
    out["dns"] = {d: n for d, n in new["dns"].items() if d in old["dns"]}
    return out, kept


def fold(old: dict[str, Any], new: dict[str, Any], budget: Budget, now_ms: int,
         fit: Any) -> tuple[dict[str, Any], int]:
    """``old`` updated with what ``new`` may teach it; the model refitted, its envelope widened no faster than
    WIDEN_PER_DAY since the last folding."""
    elapsed_days = max(now_ms - budget.last_ms, 0) / 86_400_000
    budget.refill(now_ms)
    allowed, kept = capped(old, new, budget)
    merged = merge_profiles(old, allowed, random.Random(now_ms))
    merged["identity"] = old.get("identity") or {}
    fit(merged)
    before = (old.get("model") or {}).get("envelope")
    after = merged["model"]["envelope"]
    if before:
        grow = 1.0 + WIDEN_PER_DAY * max(elapsed_days, DRIFT_EVERY_MS / 86_400_000)
        merged["model"]["envelope"] = [min(a, b * grow) for a, b in zip(after, before, strict=True)]
    return merged, kept
