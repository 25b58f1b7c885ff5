"""The baseline stages: learn each local device's normal behaviour (ProfileLearner), and say how far each of
its flows departs from it (BaselineStage).

Per flow of a profiled device the score, ``anomaly`` in 0..1, combines evidence in the way independent
indicators combine (1 - the product of what each leaves unexplained):

* novelty: a remote peer, local peer, service (protocol/port, in each direction), application or DNS
  domain the device never used, contacts from the Internet to a device that never received any, a
  contact by bare address from a device that names its peers, activity in an hour of the day it was never
  active (once it was learnt over 3 days or more). Each weighs by how sure the device's history makes us
  that it does not do new things: Good-Turing's missing mass of that kind of thing (a plug with two cloud
  names seen 10,000 times is sure; a TV with a new CDN address every hour is not);
* density: the device's statistics over the current minute, scored by its model
  (iotscan.detect.density) once they leave its learnt envelope;
* MUD: a flow the device's MUD file does not allow (iotscan.detect.mud);
* suspicion: anomalies of one device cluster in time when it is compromised (a login, then a download,
  then a controller): novelty shortly after a strong anomaly of the same device weighs more.

An anomaly at or above the threshold is an ``alert`` record (kind ``anomaly``), once per kind of evidence
in an episode of the device (anomalies less than EPISODE_MS apart); a device that is not in the baseline is
an ``alert`` of kind ``new_device``, once. The stage reads flow records only; it never holds one back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from iotscan.capture.names import registered_domain
from iotscan.capture.side_pass import SidePass
from iotscan.detect.density import Density, fit_model
from iotscan.detect.drift import DRIFT_BELOW, DRIFT_EVERY_MS, Budget, fold
from iotscan.detect.profiles import (
    WINDOW_MS,
    DeviceProfile,
    DeviceTally,
    NameOf,
    Side,
    Window,
    days_text,
    dns_domain,
    flow_sides,
    is_mac,
    merge_baselines,
    new_baseline,
    prefix_of,
    save_baseline,
    span_json,
)
from iotscan.detect.replies import Replies, replies_pass
from iotscan.output.records import alert_record, iso_timestamp
from iotscan.stage import Event, SourceInfo, Stage

THRESHOLD = 0.75  # anomaly at or above which a flow is an alert
EPISODE_MS = 600_000  # anomalies of a device less than 10 minutes apart are one episode: one alert, unless stronger
ESCALATION = 0.05  # how much stronger a departure must be to be alerted again within an episode
MAX_ALERT_KEYS = 10_000  # departures remembered per device (then it alerts no more: bounded memory)
SUSPICION_HALF_LIFE_MS = 600_000
SUSPICION_WEIGHT = 0.6  # how much a recent strong anomaly adds to a new one's novelty
MAX_DEVICES = 4096
MEMO_SIDES = 4096  # per device: the departures of the sides it showed, kept (then forgotten, all at once)
# What each kind of evidence weighs at full confidence (the device's history leaves no room for new things).
W_PEER = 0.5  # a remote peer never contacted, nor any name of its domain or address of its block
W_PEER_NEAR = 0.15  # a new name under a domain it uses, a new address in a block it uses
W_UNNAMED = 0.4  # a contact by bare address from a device that names its peers
W_INBOUND = 0.5  # contacted from the Internet, never before
W_LOCAL = 0.35
W_SERVICE = {True: 0.5, False: 0.6}  # a protocol/port never used (started by the device, served by it)
W_PEER_SERVICE = 0.15  # a known peer on a port it never used with it
W_APP = 0.4
W_DNS = 0.3
W_HOUR = 0.2
W_MUD = 0.9
NAMED_SHARE = 0.9  # a device "names its peers" when this share of its Internet flows went to names


def combine(weights: list[float]) -> float:
    left = 1.0
    for w in weights:
        left *= 1.0 - w
    return 1.0 - left


class Names:
    """The names DNS answers gave the addresses a host contacted: the host-behaviour stage's replies pass when
    it runs (``borrow``), else one of its own."""

    def __init__(self, borrow: Callable[[], Replies] | None = None) -> None:
        self.borrow = borrow
        self.replies = Replies()
        self._pass: SidePass | None = None
        self._info: SourceInfo | None = None
        self._final = False

    def begin(self, source: SourceInfo) -> None:
        self.stop()
        self._info, self._final, self.replies = source, False, Replies()

    def start(self) -> None:
        """Start the pass of its own, if it needs one and has none yet (Stage.metering: the main meter runs)."""
        if self.borrow is None and self._pass is None and self._info is not None and not self._final:
            self._pass, self.replies = replies_pass(self._info.config.source, self._info.config)
            self._pass.start()

    def name_of(self) -> NameOf:
        """Called per flow: the lookup, once the pass has what it needs (on a file, all of it)."""
        if self.borrow is not None:
            return self.borrow().name_of
        if self._pass is not None and not self._final and self._info is not None and not self._info.config.live:
            self._pass.end()  # a file's replies pass reads ahead: complete before the first flow is judged
            self._final = True
        return self.replies.name_of

    def stop(self) -> None:
        if self._pass is not None:
            if self._info is not None and self._info.config.live:
                self._pass.end()
            self._pass.stop()
            self._pass = None


class ProfileLearner(Stage):
    """Counts each local device's flows into a profile (``baseline()`` at the end). Needs the device stage."""

    def __init__(self, borrow: Callable[[], Replies] | None = None) -> None:
        super().__init__()
        self.names = Names(borrow)
        self.tallies: dict[str, DeviceTally] = {}
        self.sources: list[str] = []
        self.first_ms: int | None = None
        self.last_ms = 0

    def begin(self, source: SourceInfo) -> None:
        self.names.begin(source)
        self.sources.append(source.name)

    def end(self, source: SourceInfo) -> None:
        self.names.stop()

    def metering(self) -> None:
        self.names.start()

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        name_of: NameOf | None = None
        for event in events:
            record, flow = event
            if record is not None and flow is not None:
                if name_of is None:
                    name_of = self.names.name_of()
                self.learn(record, name_of)
            yield event

    def learn(self, r: dict[str, Any], name_of: NameOf | None) -> None:
        if self.first_ms is None or r["first_seen_ms"] < self.first_ms:
            self.first_ms = r["first_seen_ms"]
        self.last_ms = max(self.last_ms, r["last_seen_ms"])
        sides = flow_sides(r, name_of)
        for side in sides:
            tally = self.tallies.get(side.device)
            if tally is None:
                if len(self.tallies) >= MAX_DEVICES:
                    continue
                tally = self.tallies[side.device] = DeviceTally(side.device)
            tally.add(side, r)

    def finish(self) -> list[dict[str, Any]]:
        self.names.stop()
        return []

    def profiles(self) -> dict[str, dict[str, Any]]:
        """What was learnt per device, as profiles (without a model), and start counting again."""
        out = {mac: tally.profile() for mac, tally in sorted(self.tallies.items())}
        self.tallies = {}
        return out

    def baseline(self, identities: dict[str, dict[str, Any]], old: dict[str, Any] | None = None,
                 kind: str | None = None) -> dict[str, Any]:
        """What was learnt, as a baseline document (``old`` updated with it, when given); devices the device
        stage did not keep as devices (no local address of their own) are left out."""
        new = new_baseline()
        if self.first_ms is not None:
            new["span"] = span_json(iso_timestamp(self.first_ms), iso_timestamp(self.last_ms))
        new["sources"] = self.sources
        for mac, tally in sorted(self.tallies.items()):
            if mac not in identities:
                continue
            profile = tally.profile()
            profile["identity"] = identities[mac]
            new["devices"][mac] = profile
        return merge_baselines(old or new_baseline(), new, lambda p: fit_profile(p, kind))


def fit_profile(profile: dict[str, Any], kind: str | None = None) -> None:
    """Fit (again) the density model of a profile from its sampled minutes."""
    from iotscan.detect.density import DEFAULT_KIND

    profile["model"] = fit_model(profile["windows"]["sample"], kind or DEFAULT_KIND)


def identity_of(device: dict[str, Any]) -> dict[str, Any]:
    """What a baseline keeps of a device record."""
    return {k: device.get(k) for k in ("vendor", "device_type", "model", "mac_vendor", "confidence", "ips")}


_Evidence = tuple[float, str, str, tuple[Any, ...]]  # (weight, kind, reason, what it is about)
_VOLUME = ("volume",)


class _DeviceState:
    """One device's state while scoring: its current minute, suspicion, alert episode."""

    __slots__ = ("alerted", "density", "episode_ms", "episode_score", "suspicion", "suspicion_ms", "weight",
                 "weight_counts", "window")

    def __init__(self) -> None:
        self.window: Window | None = None
        self.density: tuple[float, str, str] | None = None  # the current minute's (weight, reason, feature)
        self.weight_counts: list[int] | None = None
        self.weight = 0.0
        self.suspicion = 0.0
        self.suspicion_ms = 0
        self.episode_ms = -EPISODE_MS  # the last anomaly at or above the threshold
        self.episode_score = 0.0  # the strongest anomaly alerted in the episode
        self.alerted: set[tuple[Any, ...]] = set()  # departures of anomalies at or above the threshold in the run


class _Judgement:
    """One device's side of a flow, judged."""

    __slots__ = ("alert_score", "device", "keys", "kind", "reasons", "score", "state")

    def __init__(self, device: str, state: _DeviceState) -> None:
        self.device, self.state = device, state
        self.score = self.alert_score = 0.0
        self.reasons: list[str] = []
        self.kind = ""
        self.keys: list[tuple[Any, ...]] = []


class BaselineStage(Stage):
    """Scores every flow of a profiled device against its profile: ``anomaly`` and ``anomaly_reasons`` on flow
    records, ``alert`` records (kinds anomaly and new_device)."""

    def __init__(self, baseline: dict[str, Any], *, threshold: float = THRESHOLD,
                 borrow: Callable[[], Replies] | None = None, mud: dict[str, Any] | None = None,
                 vendor: Callable[[str], str | None] | None = None, learn_s: float | None = None,
                 drift: bool = False) -> None:
        super().__init__()
        self.threshold = threshold
        self.doc = baseline
        self.learn_s = learn_s  # live --learn: seconds of learning before watching
        self.learning: ProfileLearner | None = ProfileLearner(borrow) if learn_s else None
        self._learn_until: float | None = None
        self.drift: ProfileLearner | None = ProfileLearner(borrow) if drift else None
        self.budgets: dict[str, Budget] = {}
        self._drift_ms = 0
        self.drifted = 0  # new things the profiles learnt while watching
        self.names = Names(borrow)
        self.mud = mud or {}
        self.vendor = vendor or (lambda mac: None)
        self.profiles: dict[str, DeviceProfile] = {}
        self.densities: dict[str, Density] = {}
        self.load(baseline)
        self.states: dict[str, _DeviceState] = {}
        self.new_devices: set[str] = set()
        self.alerts: Counter[str] = Counter()
        self.anomalous_flows = 0
        self._source = ""

    def load(self, baseline: dict[str, Any]) -> None:
        """(Re)load the profiles of a baseline document (live: after learning, and as profiles drift)."""
        for mac, d in baseline["devices"].items():
            self.profiles[mac] = DeviceProfile(mac, d)
            if d.get("model") is not None:
                self.densities[mac] = Density(d["model"])

    def begin(self, source: SourceInfo) -> None:
        self._source = source.name
        self.names.begin(source)
        for learner in (self.learning, self.drift):
            if learner is not None:
                learner.sources.append(source.name)
        self.states = {}  # a capture is a time of its own: minutes and episodes start again

    def end(self, source: SourceInfo) -> None:
        self.names.stop()

    def metering(self) -> None:
        self.names.start()

    def finish(self) -> list[dict[str, Any]]:
        self.names.stop()
        return []

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        name_of: NameOf | None = None
        for event in events:
            record, flow = event
            if self.learning is not None and self._learnt():
                self._start_watching()
            if record is not None and flow is not None:
                if name_of is None:
                    name_of = self.names.name_of()
                if self.learning is not None:
                    self.learning.learn(record, name_of)
                    record["anomaly"], record["anomaly_reasons"] = None, []
                else:
                    yield from self.score(record, name_of)
                    if self.drift is not None:
                        self._keep_current(record, name_of)
            yield event

    # -- live: learn first, then watch; drift ----------------------------------------------------------------

    def _learnt(self) -> bool:
        now = time.monotonic()
        if self._learn_until is None:
            self._learn_until = now + (self.learn_s or 0.0)
        return now >= self._learn_until

    def _start_watching(self) -> None:
        """The end of live --learn: what was learnt becomes (or updates) the baseline."""
        assert self.learning is not None
        learnt, self.learning = self.learning, None
        new = new_baseline()
        if learnt.first_ms is not None:
            new["span"] = span_json(iso_timestamp(learnt.first_ms), iso_timestamp(learnt.last_ms))
        new["sources"] = learnt.sources
        new["devices"] = learnt.profiles()
        self.doc = merge_baselines(self.doc, new, fit_profile)
        self.load(self.doc)

    def _keep_current(self, r: dict[str, Any], name_of: NameOf | None) -> None:
        """Count the flows that raised nothing, and fold them into the profiles every DRIFT_EVERY_MS."""
        assert self.drift is not None
        anomaly = r.get("anomaly")
        if anomaly is not None and anomaly < DRIFT_BELOW and r.get("verdict") != "attack":
            self.drift.learn(r, name_of)
        now = r["last_seen_ms"]
        if not self._drift_ms:
            self._drift_ms = now
        elif now - self._drift_ms >= DRIFT_EVERY_MS:
            self._drift_ms = now
            self.fold(now)

    def fold(self, now_ms: int) -> None:
        """Fold what the drift learner counted into the profiles (capped: iotscan.detect.drift)."""
        assert self.drift is not None
        devices = dict(self.doc["devices"])
        for mac, new in self.drift.profiles().items():
            old = devices.get(mac)
            if old is None:
                continue  # a device the baseline does not know is reported, never learnt by drifting
            budget = self.budgets.get(mac) or self.budgets.setdefault(mac, Budget(now_ms))
            devices[mac], kept = fold(old, new, budget, now_ms, fit_profile)
            self.drifted += kept
        self.doc = {**self.doc, "devices": devices}
        if self.drift.first_ms is not None and self.doc.get("span"):
            self.doc["span"] = span_json(self.doc["span"]["first_seen"], max(
                self.doc["span"]["last_seen"], iso_timestamp(self.drift.last_ms)))
        self.load(self.doc)

    def save(self, path: Any, identities: dict[str, dict[str, Any]]) -> None:
        """Write the baseline as it is now (learnt, drifted), the device stage's identities filled in."""
        if self.learning is not None:
            self._start_watching()
        if self.drift is not None and self.drift.tallies:
            self.fold(self.drift.last_ms)
        for mac, profile in self.doc["devices"].items():
            if not profile.get("identity") and mac in identities:
                profile["identity"] = identities[mac]
        save_baseline(self.doc, path)

    def score(self, r: dict[str, Any], name_of: NameOf | None) -> list[Event]:
        """Set the flow's anomaly fields; the alerts it raises."""
        alerts: list[Event] = []
        best: _Judgement | None = None
        judged_any = False
        for side in flow_sides(r, name_of):
            profile = self.profiles.get(side.device)
            if profile is None and side.device not in self.mud:
                if side.device not in self.new_devices and len(self.new_devices) < MAX_DEVICES:
                    self.new_devices.add(side.device)
                    alerts.append((self._new_device_alert(side, r), None))
                continue
            judged_any = True
            judged = self.judge(profile, side, r)
            if judged is not None and (best is None or judged.score > best.score):
                best = judged
        if best is None:  # no side judged (None), or nothing departs (0)
            r["anomaly"], r["anomaly_reasons"] = (0.0 if judged_any else None), []
            return alerts
        r["anomaly"], r["anomaly_reasons"] = round(best.score, 3), best.reasons
        if best.score >= self.threshold:
            self.anomalous_flows += 1
            alert = self._alert(best, r)
            if alert is not None:
                alerts.append((alert, None))
        return alerts

    def judge(self, p: DeviceProfile | None, side: Side, r: dict[str, Any]) -> _Judgement | None:
        """How far one device's side of a flow departs from its profile (and its MUD file); None when it does not
        depart at all (most flows: no judgement is made of them)."""
        state = self.states.get(side.device)
        if state is None:
            state = self.states[side.device] = _DeviceState()
        evidence: list[_Evidence] = []
        novelty: list[str] = []
        if p is not None:
            self._novelty(p, side, r, evidence, novelty)
            self._density(side, r, state, evidence)
        policy = self.mud.get(side.device)
        if policy is not None:
            allowed, why = policy.allows(side, r)
            if not allowed:
                evidence.append((W_MUD, "mud", why, ("mud", side.peer, side.service, side.out)))
        if not evidence:
            return None
        judged = _Judgement(side.device, state)
        evidence.sort(key=lambda e: -e[0])
        ms = r["last_seen_ms"]
        suspicion = state.suspicion * 0.5 ** ((ms - state.suspicion_ms) / SUSPICION_HALF_LIFE_MS)
        extra = [SUSPICION_WEIGHT * suspicion] if novelty and suspicion >= 0.05 else []
        judged.score = combine([e[0] for e in evidence] + extra)
        # what is new to alert: departures not alerted yet in the run (a minute's volume: in the episode)
        if ms - state.episode_ms > EPISODE_MS:
            state.alerted.discard(_VOLUME)
        fresh = [e for e in evidence if e[3] not in state.alerted]
        judged.alert_score = combine([e[0] for e in fresh] + extra)
        judged.keys = [e[3] for e in evidence]
        if judged.score >= self.threshold and judged.score >= suspicion:
            state.suspicion, state.suspicion_ms = judged.score, ms
        if novelty:
            judged.reasons.append(_novelty_reason(p, side, novelty))
        judged.reasons += [why for _, _, why, _ in evidence if why]
        judged.kind = evidence[0][1]
        return judged

    def _novelty(self, p: DeviceProfile, side: Side, r: dict[str, Any], evidence: list[_Evidence],
                 novelty: list[str]) -> None:
        key = (side.peer, side.remote, side.named, side.out, side.service, side.app)
        departs = p.memo.get(key)
        if departs is None:  # the profile does not change while it scores: a side's departures, once per kind
            if len(p.memo) >= MEMO_SIDES:
                p.memo.clear()
            departs = p.memo[key] = _departures(p, side)
        if departs[0]:
            evidence += departs[0]
            novelty += departs[1]
        if side.out:
            domain = dns_domain(side, r)
            if domain is not None and domain not in p.dns:
                evidence.append((W_DNS * (1.0 - p.novel_dns), "new_dns", "", ("dns", domain)))
                novelty.append(f"a DNS domain it never asked, {domain}")
        if p.quiet_hours:
            hour = (r["last_seen_ms"] // 3_600_000) % 24
            if hour in p.quiet_hours:
                evidence.append((W_HOUR, "hour", f"active at {hour:02d}h UTC, an hour it never was in "
                                                 f"{days_text(p.days)}", ("hour", hour)))

    def _density(self, side: Side, r: dict[str, Any], state: _DeviceState, evidence: list[_Evidence]) -> None:
        density = self.densities.get(side.device)
        if density is None:
            return
        index = r["last_seen_ms"] // WINDOW_MS
        window = state.window
        if window is None or index > window.index:
            window = state.window = Window(index)
            state.density = None
        window.add(side, r)
        counts = window.counts
        if not window.outside:  # a minute's counts only grow: once outside its envelope, it stays outside
            if not density.outside(counts):
                return
            window.outside = True
        if state.density is None or _grown(state.weight_counts, counts):
            weight = density.weight(counts)
            reason, feature = density.reason(counts)
            state.density, state.weight_counts = (weight, reason, feature), list(counts)
        weight, reason, _ = state.density
        if weight > 0:
            evidence.append((weight, "volume", reason, _VOLUME))

    def _alert(self, judged: _Judgement, r: dict[str, Any]) -> dict[str, Any] | None:
        """The alert for an anomaly, if it departs in a way not alerted yet: each departure (a peer, a port, a
        protocol...) once per run, a minute's volume once per episode; within an episode of the device (anomalies
        less than EPISODE_MS apart) only a stronger departure than the one alerted."""
        state, mac = judged.state, judged.device
        ms = r["last_seen_ms"]
        if ms - state.episode_ms > EPISODE_MS:
            state.episode_score = 0.0
        state.episode_ms = max(state.episode_ms, ms)
        fresh = judged.alert_score >= self.threshold and judged.score > state.episode_score + ESCALATION
        if len(state.alerted) < MAX_ALERT_KEYS:
            state.alerted.update(judged.keys)
        if not fresh:
            return None
        state.episode_score = judged.score
        score, reasons, kind = judged.score, judged.reasons, judged.kind
        self.alerts["anomaly"] += 1
        profile = self.profiles.get(mac)
        identity = profile.identity if profile is not None else {}
        what = identity.get("device_type") or "device"
        host_ip = r["src_ip"] if r.get("src_device") == mac else r["dst_ip"]
        name = " ".join(str(x) for x in (identity.get("vendor"), what) if x and x != "unknown") or "device"
        return alert_record(
            decided_ms=ms, source=self._source, kind="anomaly", detail=kind, family=None, score=round(score, 3),
            host_ip=host_ip, host_mac=mac, host_device=mac,
            message=f"{host_ip} ({name}) departs from its baseline: {reasons[0] if reasons else kind}",
            reasons=reasons,
            evidence={"baseline_days": round(profile.days, 2) if profile is not None else None,
                      "baseline_flows": profile.flows if profile is not None else None},
            first_seen_ms=r["first_seen_ms"], last_seen_ms=ms,
            evidence_community_ids=[r["community_id"]] if r.get("community_id") else [])

    def _new_device_alert(self, side: Side, r: dict[str, Any]) -> dict[str, Any]:
        self.alerts["new_device"] += 1
        mac = side.device
        ip = r["src_ip"] if side.out else r["dst_ip"]
        vendor = self.vendor(mac)
        message = f"a device that is not in the baseline: {mac}{f' ({vendor})' if vendor else ''} at {ip}"
        return alert_record(
            decided_ms=r["last_seen_ms"], source=self._source, kind="new_device", detail=vendor, family=None,
            score=1.0, host_ip=ip, host_mac=mac, host_device=mac, message=message, reasons=[message],
            evidence={"baseline_devices": len(self.profiles)}, first_seen_ms=r["first_seen_ms"],
            last_seen_ms=r["last_seen_ms"],
            evidence_community_ids=[r["community_id"]] if r.get("community_id") else [])

    def summarize(self, summary: dict[str, Any]) -> None:
        super().summarize(summary)
        kinds = Counter(summary.get("alert_kinds") or {})
        kinds.update(self.alerts)
        summary["alerts"] = (summary.get("alerts") or 0) + sum(self.alerts.values())
        summary["alert_kinds"] = dict(kinds.most_common())
        summary["baseline"] = {"devices": len(self.profiles), "new_devices": len(self.new_devices),
                               "anomalous_flows": self.anomalous_flows, "threshold": self.threshold}
        if self.learn_s:
            summary["baseline"]["learning"] = "learning" if self.learning is not None else "done"
        if self.drift is not None:
            summary["baseline"]["drifted"] = self.drifted


def _departures(p: DeviceProfile, side: Side) -> tuple[tuple[_Evidence, ...], tuple[str, ...]]:
    """What a device's side of a flow departs from its profile in, by the side alone (its peer, service,
    application): the evidence and the words for the reason."""
    evidence: list[_Evidence] = []
    novelty: list[str] = []
    peer = side.peer
    if side.remote:
        known = peer in (p.remote_names if side.named else p.remote_addresses)
        confidence = 1.0 - p.novel_remote
        if not known:
            near = registered_domain(peer) in p.domains if side.named else prefix_of(peer) in p.prefixes
            evidence.append(((W_PEER_NEAR if near else W_PEER) * confidence, "new_peer", "", ("peer", peer)))
            novelty.append("a new name of a domain it uses" if near and side.named else
                           "a new address of a block it uses" if near else "a new peer")
        if side.out and not side.named and p.named_share >= NAMED_SHARE:
            evidence.append((W_UNNAMED * p.named_share, "no_dns",
                             f"contacted by address, though {p.named_share:.0%} of its Internet flows went "
                             "to peers DNS or TLS named", ("no_dns", peer)))
        if not side.out and not p.remote_in:
            evidence.append((W_INBOUND, "inbound", "contacted from the Internet, which its baseline never was",
                             ("inbound", peer)))
    elif peer not in p.local:
        known = False
        evidence.append((W_LOCAL * (1.0 - p.novel_local), "new_local_peer", "", ("peer", peer)))
        novelty.append("a new local peer")
    else:
        known = True
    if side.service not in p.services[side.out]:
        evidence.append((W_SERVICE[side.out] * (1.0 - p.novel_service[side.out]), "new_service", "",
                         ("service", side.service, side.out)))
        novelty.append("a port it never used" if side.out else "a port it never served")
    elif known and side.service not in p.peer_services[peer][0 if side.out else 1]:
        evidence.append((W_PEER_SERVICE, "new_service", "", ("service", peer, side.service, side.out)))
        novelty.append("a new port of a known peer")
    if side.app is not None and side.app not in p.apps:
        evidence.append((W_APP * (1.0 - p.novel_app), "new_app", "", ("app", side.app)))
        novelty.append("a protocol it never spoke")
    return tuple(evidence), tuple(novelty)


def _novelty_reason(p: DeviceProfile | None, side: Side, novelty: list[str]) -> str:
    """"first contact with irc.example.net:6667/IRC (a new peer, a port it never used), never seen in 14 days of
    this device"."""
    port = side.service.partition("/")[2]
    peer = side.peer if side.remote or not is_mac(side.peer) else f"{side.peer_ip} ({side.peer})"
    service = f"{port}/{side.app or side.service.partition('/')[0].upper()}" if port else side.app or side.service
    new_peer = novelty[0] in ("a new peer", "a new local peer")
    if side.out:
        what = f"{peer}:{service}" if port else f"{peer} {service}"
        lead = f"first contact with {what}" if new_peer else what
    else:
        lead = f"{'first contact from' if new_peer else 'contacted by'} {peer} on its {service}"
    rest = novelty[1:] if new_peer else novelty
    extra = f" ({', '.join(rest)})" if rest else ""
    span = f", never seen in {days_text(p.days)} of this device" if p is not None else ""
    return f"{lead}{extra}{span}"


def _grown(before: list[int] | None, now: list[int]) -> bool:
    """Whether a minute's statistics grew enough since the model last scored them to score again (by a
    quarter, in any of them): a flood's minute is scored a few dozen times, not per flow."""
    if before is None:
        return True
    return any(n > b * 1.25 + 1 for b, n in zip(before, now, strict=True))
