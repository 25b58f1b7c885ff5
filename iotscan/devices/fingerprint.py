"""Fusion: every signal about one device -> {vendor, device_type, model, confidence, evidence}.

Each signal votes for vendors, types and models with a weight in 0..1: the MAC vendor and what its
maker makes (a prior), signature matches (product knowledge in iotscan/data/device_signatures.json,
generic type evidence in iotscan/data/device_types.json: product words in names, services, HomeKit
categories, UPnP device types), the gateway role, and the trained behaviour model
(iotscan/devices/behaviour.py features). Votes for one candidate combine as a noisy-OR,
1 - prod(1 - w), so independent signals reinforce each other and none reaches 1.

The rules that keep unknowns honest (a confident wrong type is worse than "unknown"):
* the behaviour model's vote is scaled by how much of the device's self-description (names,
  domains, mDNS/SSDP, JA4, OUI...) it has seen in training for the class it proposes: a device
  unlike anything in training gets little from it, whatever its raw probability;
* a device whose self-description was not seen in training (a model iotscan was not trained on)
  gets its behaviour's type only as a hint, from the type model (behaviour alone -> device type;
  each model left out of training in turn, it types less than half of their captures right):
  never enough to type it alone, and no model is named from behaviour for it;
* a type needs a combined score of 0.4 and 1.3 times the next type's score (or 0.25 and 1.5 times,
  then with a low confidence), else the device is "unknown" and ``type_guess`` carries the best
  type and its score;
* a model needs 0.5 and a clear margin over the next model, else it is null and, when two models
  tie, the evidence says so;
* models that described themselves identically in training (same DHCP, mDNS, SSDP, domains, OUI:
  "look-alikes", found on the training data) are never named from behaviour alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iotscan.detect import trees
from iotscan.detect.modelstore import bundled_model, load_model, verified_card
from iotscan.devices.behaviour import (
    FEATURE_SCHEMA_VERSION,
    DeviceActivity,
    behaviour_only,
    device_features,
    identity_tokens,
    signal_values,
)
from iotscan.devices.signatures import MacVendor, Match, Signatures, describe_types
from iotscan.errors import ModelError
from iotscan.output.records import iso_timestamp

TYPE_THRESHOLD = 0.4
WEAK_TYPE_THRESHOLD = 0.25
WEAK_TYPE_LEAD = 1.5  # a weak type must score 1.5 times the next one
MODEL_THRESHOLD = 0.5
MODEL_MARGIN = 0.15
MAX_EVIDENCE = 10
STRONG_TYPE_LEAD = 1.3  # contradictory evidence (two types scoring alike) leaves a device unknown
MAC_VENDOR_WEIGHT = 0.5  # a MAC prefix names the network chip's buyer, usually the product's vendor
NEUTRAL_SUPPORT = 0.5  # a device with no self-description at all: behaviour alone decides
# A model seen: the device's identity tokens were (nearly) all seen for the label the behaviour model
# proposes, with some confidence (with one token, an OUI, "all seen" says little), or most of them with
# a high confidence (a capture of a known model resolving a name it never did before) if none of the
# unseen ones is a name the device gives itself (another model's twin announces its own model name).
SEEN_SUPPORT, SEEN_PROBABILITY = 0.95, 0.4
MOSTLY_SEEN_SUPPORT, MOSTLY_SEEN_PROBABILITY = 0.8, 0.8
OWN_NAME_PREFIXES = ("hostname=", "cloud_model=")  # identity tokens that name the device itself
# The type model's vote on a device of a model not seen: with a weak prior, still below WEAK_TYPE_THRESHOLD,
# so behaviour never types it (left out of training in turn, models were typed right by it less than half
# the time).
NOVEL_BEHAVIOUR_WEIGHT = 0.2


@dataclass
class DeviceModel:
    """The trained behaviour model (a dict bundle saved by iotscan/training/devices.py)."""

    bundle: dict[str, Any]
    card: dict[str, Any]
    path: Path
    _token_sets: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: Path | None = None, trusted: bool = False) -> DeviceModel:
        model_path = path or bundled_model("devices")
        bundle, card = load_model(model_path, trusted=trusted, schema_version=FEATURE_SCHEMA_VERSION)
        try:
            if "pipeline" in bundle:  # trained before iotscan kept its trees as arrays: scikit-learn's pipeline
                pipeline = bundle.pop("pipeline")
                bundle["columns"], bundle["forest"] = dict(pipeline[0].vocabulary_), trees.compact(pipeline[-1])
            if not isinstance(bundle["columns"], dict) or not isinstance(bundle["forest"], trees.Forest):
                raise TypeError("no columns and forest")
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ModelError(f"{model_path}: not an iotscan device model ({exc})") from exc
        return cls(bundle, card, model_path)

    @staticmethod
    def check(path: Path | None = None, trusted: bool = False) -> Path:
        """Fail early, without unpickling: the model file exists and (unless trusted) matches its card."""
        model_path = path or bundled_model("devices")
        if trusted:
            if not model_path.is_file():
                raise ModelError(f"{model_path}: model file not found")
        else:
            verified_card(model_path)
        return model_path

    @property
    def labels(self) -> Mapping[str, Mapping[str, str]]:
        return self.bundle["label_info"]

    def predict(self, features: Mapping[str, float]) -> list[tuple[str, float]]:
        """(model label, probability), most probable first."""
        return self.predict_many([features])[0]

    def predict_many(self, rows: Sequence[Mapping[str, float]]) -> list[list[tuple[str, float]]]:
        """predict() for many devices in one call: a forest costs per call far more than per row."""
        return _predict(self.bundle["columns"], self.bundle["forest"], rows)

    def predict_types(self, rows: Sequence[Mapping[str, float]]) -> list[list[tuple[str, float]]]:
        """(device type, probability) from behaviour alone, most probable first, for each device: the type
        model, trained on device types, with the models of each type pooled (empty for a model file
        made before it existed)."""
        if "type_forest" not in self.bundle:
            return [[] for _ in rows]
        return _predict(self.bundle["type_columns"], self.bundle["type_forest"],
                        [behaviour_only(row) for row in rows])

    def lookalikes(self, label: str) -> list[str]:
        """Other labels whose core self-description in training was the same as this one's."""
        return sorted(self.bundle.get("lookalikes", {}).get(label, ()))

    def support(self, features: Mapping[str, float], label: str) -> float:
        """Share of the device's identity tokens seen in training for this label (NEUTRAL_SUPPORT if none)."""
        tokens = identity_tokens(features)
        if not tokens:
            return NEUTRAL_SUPPORT
        return len(tokens & self._tokens(label)) / len(tokens)

    def unseen(self, features: Mapping[str, float], label: str, prefixes: tuple[str, ...]) -> list[str]:
        """The device's identity tokens of these kinds never seen in training for this label."""
        known = self._tokens(label)
        return [t for t in identity_tokens(features) if t.startswith(prefixes) and t not in known]

    def _tokens(self, label: str) -> frozenset[str]:
        known = self._token_sets.get(label)
        if known is None:
            known = self._token_sets[label] = frozenset(self.bundle["label_tokens"].get(label, ()))
        return known


def _predict(columns: Mapping[str, int], forest: trees.Forest,
             rows: Sequence[Mapping[str, float]]) -> list[list[tuple[str, float]]]:
    if not rows:
        return []
    X = np.zeros((len(rows), len(columns)))  # as DictVectorizer: a feature's value in its column
    for i, row in enumerate(rows):
        for name, value in row.items():
            j = columns.get(name)
            if j is not None:
                X[i, j] = value
    labels = [str(label) for label in forest.classes]
    return [sorted(zip(labels, map(float, probs), strict=True), key=lambda t: -t[1])
            for probs in forest.predict_proba(X)]


@dataclass
class _Votes:
    weights: dict[str, list[float]]

    def add(self, key: str | None, weight: float) -> None:
        if key and weight > 0:
            self.weights.setdefault(key, []).append(min(weight, 0.99))

    def ranked(self) -> list[tuple[str, float]]:
        scores = []
        for key, weights in self.weights.items():
            miss = 1.0
            for w in weights:
                miss *= 1.0 - w
            scores.append((key, 1.0 - miss))
        return sorted(scores, key=lambda t: (-t[1], t[0]))


def _evidence(signal: str, value: Any, points_to: str) -> dict[str, str]:
    return {"signal": signal, "value": str(value)[:120], "points_to": points_to}


@dataclass
class DeviceEvidence:
    """Everything known about one local device, ready for fusion."""

    mac: str
    activity: DeviceActivity
    hints: Mapping[str, Mapping[str, int]] | None
    ips: Sequence[str]
    served_devices: int = 0  # local devices whose Internet traffic this MAC forwards


def fingerprint_devices(devices: Sequence[DeviceEvidence], signatures: Signatures,
                        model: DeviceModel | None) -> list[dict[str, Any]]:
    """Device records for many devices, with one batched call to the behaviour model."""
    features = [device_features(d.activity, d.hints, d.mac, signatures.mac_vendor(d.mac).org) for d in devices]
    ranked = model.predict_many(features) if model is not None else [[] for _ in devices]
    typed = model.predict_types(features) if model is not None else [[] for _ in devices]
    return [fingerprint(d.mac, d.activity, d.hints, signatures, model, d.ips, d.served_devices,
                        prediction=(f, r, t))
            for d, f, r, t in zip(devices, features, ranked, typed, strict=True)]


def fingerprint(mac: str, activity: DeviceActivity, hints: Mapping[str, Mapping[str, int]] | None,
                signatures: Signatures, model: DeviceModel | None, ips: Sequence[str],
                served_devices: int = 0,
                prediction: tuple[Mapping[str, float], list[tuple[str, float]], list[tuple[str, float]]] | None = None,
                ) -> dict[str, Any]:
    """The device record of one local device (``prediction``: its features, the model's and the type model's
    outputs, if known)."""
    vendors, types, models = _Votes({}), _Votes({}), _Votes({})
    model_info: dict[str, tuple[str | None, str | None]] = {}  # model -> (vendor, type)
    weighted: list[tuple[float, dict[str, str]]] = []

    mac_vendor = signatures.mac_vendor(mac)
    _vote_mac_vendor(mac_vendor, vendors, types, weighted)

    values = signal_values(activity, hints)
    matches = signatures.match(values)
    for m in matches:
        _vote_match(m, vendors, types, models, model_info)
        weighted.append((m.weight, _evidence(m.signal, m.value, m.points_to)))

    if served_devices:
        weight = 0.6 if served_devices == 1 else 0.85
        types.add("router", weight)
        weighted.append((weight, _evidence("gateway", f"forwards Internet traffic of {served_devices} local "
                                           f"device{'s' if served_devices > 1 else ''}", "router")))
    if activity.served_apps.get("DHCP") and any(port == 67 and srv for (_p, port, srv) in activity.ports):
        types.add("router", 0.5)
        weighted.append((0.5, _evidence("dhcp_server", "answers DHCP", "router or access point")))

    ambiguous: tuple[str, str] | None = None
    if model is not None:
        if prediction is None:
            features = device_features(activity, hints, mac, mac_vendor.org)
            ranked, behaviour_types = model.predict(features), model.predict_types([features])[0]
        else:
            features, ranked, behaviour_types = prediction
        if ranked:
            top, p1 = ranked[0]
            p2 = ranked[1][1] if len(ranked) > 1 else 0.0
            support = model.support(features, top)
            scale = min(1.0, 2.0 * support)
            seen = (support >= SEEN_SUPPORT and p1 >= SEEN_PROBABILITY) or \
                (support >= MOSTLY_SEEN_SUPPORT and p1 >= MOSTLY_SEEN_PROBABILITY
                 and not model.unseen(features, top, OWN_NAME_PREFIXES))
            info = model.labels.get(top, {})
            type_probs: dict[str, float] = {}
            vendor_probs: dict[str, float] = {}
            for label, p in ranked:
                label_info = model.labels.get(label, {})
                t, v = label_info.get("device_type"), label_info.get("vendor")
                if t:
                    type_probs[t] = type_probs.get(t, 0.0) + p
                if v:
                    vendor_probs[v] = vendor_probs.get(v, 0.0) + p
            if seen:
                for t, p in type_probs.items():
                    types.add(t, p * scale)
            elif behaviour_types:
                # A model not seen: its behaviour says what it may be, never enough alone.
                for t, p in behaviour_types:
                    types.add(t, NOVEL_BEHAVIOUR_WEIGHT * p)
                t, p = behaviour_types[0]
                weighted.append((NOVEL_BEHAVIOUR_WEIGHT * p, _evidence(
                    "behaviour_type", f"p={p:.2f}, a model not seen: a hint", t)))
            for v, p in vendor_probs.items():
                vendors.add(v, p * scale)
            model_weight = p1 * scale if seen else p1 * scale * 0.5  # names a model only if it looks like it
            twins = model.lookalikes(top)
            if twins:
                # Models whose self-descriptions were identical in training: behaviour alone does not
                # name one of them; a signature still can.
                model_weight *= 0.5
                if scale >= 0.5:
                    ambiguous = (top, " | ".join(twins))
            elif p1 - p2 < MODEL_MARGIN and len(ranked) > 1:
                # A tie between look-alikes: neither gets enough to be named on behaviour alone.
                second = ranked[1][0]
                model_weight *= 0.5
                models.add(second, p2 * 0.5 * min(1.0, 2.0 * model.support(features, second)))
                second_info = model.labels.get(second, {})
                model_info.setdefault(second, (second_info.get("vendor"), second_info.get("device_type")))
                if scale >= 0.5:
                    ambiguous = (top, second)
            models.add(top, model_weight)
            model_info.setdefault(top, (info.get("vendor"), info.get("device_type")))
            if model_weight >= 0.05:
                weighted.append((model_weight, _evidence(
                    "behaviour_model", f"p={p1:.2f}, seen-before={scale:.2f}", top)))

    type_ranked = types.ranked()
    best_type, type_score = type_ranked[0] if type_ranked else ("unknown", 0.0)
    second_type = type_ranked[1][1] if len(type_ranked) > 1 else 0.0
    model_ranked = models.ranked()
    chosen_model: str | None = None
    model_score = 0.0
    if model_ranked:
        candidate, score = model_ranked[0]
        runner_up = model_ranked[1][1] if len(model_ranked) > 1 else 0.0
        _vendor, cand_type = model_info.get(candidate, (None, None))
        if score >= MODEL_THRESHOLD and score - runner_up >= MODEL_MARGIN \
                and (cand_type is None or cand_type == best_type or score > type_score):
            chosen_model, model_score = candidate, score
            if cand_type and cand_type != best_type:
                best_type, type_score = cand_type, max(score, dict(type_ranked).get(cand_type, 0.0))
    if ambiguous and chosen_model is None:
        weighted.append((0.5, _evidence("ambiguous_model", f"{ambiguous[0]} | {ambiguous[1]}",
                                        "look-alike models: no signal here separates them")))

    confidence = type_score * (1.0 - 0.5 * second_type) if best_type != "unknown" else type_score
    # A type needs TYPE_THRESHOLD and a lead over the next type, or weaker evidence that clearly prefers it
    # (then with a low confidence); a model named on clear evidence brings its type.
    typed = chosen_model is not None or \
        (type_score >= TYPE_THRESHOLD and type_score >= STRONG_TYPE_LEAD * second_type) or \
        (type_score >= WEAK_TYPE_THRESHOLD and type_score >= WEAK_TYPE_LEAD * second_type)
    device_type = best_type if typed else "unknown"
    type_guess = None
    if device_type == "unknown":
        chosen_model = None
        confidence = min(confidence, 0.3)
        if type_ranked:
            type_guess = {"device_type": type_ranked[0][0], "confidence": round(type_ranked[0][1], 3)}
    if chosen_model:
        confidence = min(confidence, model_score)

    vendor = model_info.get(chosen_model, (None, None))[0] if chosen_model else None
    if not vendor:
        vendor_ranked = vendors.ranked()
        if vendor_ranked and vendor_ranked[0][1] >= 0.3:
            vendor = vendor_ranked[0][0]
        elif mac_vendor.org and not mac_vendor.module_maker:
            vendor = mac_vendor.org

    weighted.sort(key=lambda t: -t[0])
    evidence = [e for _, e in weighted[:MAX_EVIDENCE]]
    return {
        "timestamp": iso_timestamp(activity.first_ms) if activity.flows else None,
        "event_type": "device",
        "mac": mac,
        "ips": list(ips),
        "vendor": vendor,
        "device_type": device_type,
        "model": chosen_model,
        "confidence": round(max(0.0, min(confidence, 1.0)), 3),
        "type_guess": type_guess,
        "evidence": evidence,
        "first_seen_ms": activity.first_ms,
        "last_seen_ms": activity.last_ms,
        "flows": activity.flows,
        "bytes": activity.bytes,
        "mac_vendor": mac_vendor.org,
        "sources": list(activity.sources),
    }


def _vote_mac_vendor(mv: MacVendor, vendors: _Votes, types: _Votes,
                     weighted: list[tuple[float, dict[str, str]]]) -> None:
    if mv.locally_administered:
        weighted.append((0.2, _evidence("mac_vendor", "locally administered MAC",
                                        "randomised or virtual address: no vendor from the MAC")))
    elif mv.org is None:
        weighted.append((0.1, _evidence("mac_vendor", "unregistered prefix", "no vendor from the MAC")))
    elif mv.module_maker:
        weighted.append((0.2, _evidence("mac_vendor", mv.org,
                                        "Wi-Fi module maker: the product's vendor is someone else")))
    else:
        vendor = mv.vendor or mv.org
        vendors.add(vendor, MAC_VENDOR_WEIGHT)
        for t, w in mv.types:
            types.add(t, mv.type_weight * w)
        makes = f": makes {describe_types(mv.types)}" if mv.types else ""
        weighted.append((MAC_VENDOR_WEIGHT, _evidence("mac_vendor", mv.org, vendor + makes)))


def _vote_match(m: Match, vendors: _Votes, types: _Votes, models: _Votes,
                model_info: dict[str, tuple[str | None, str | None]]) -> None:
    vendors.add(m.vendor, m.weight)
    for t, w in m.types:
        types.add(t, m.weight * w)
    if m.model:
        models.add(m.model, m.weight)
        model_info.setdefault(m.model, (m.vendor, m.types[0][0] if m.types else None))
