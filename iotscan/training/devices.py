"""Training and evaluating the device model: `iotscan devices train`.

Data: ../shared/datasets/iot-sentinel/ (one folder of setup captures per device; devices.csv gives
the MAC, vendor, model and type) and ../shared/datasets/oconnor-lab/ (week-long captures of one
device each, cut into time windows with editcap). Every capture or window is profiled by the same
code as `iotscan devices` (Analysis + DeviceStage, both passes), and the labelled MAC's profile
becomes one example.

Evaluation never splits a capture: StratifiedGroupKFold over capture files (the windows of one
oconnor-lab capture stay together). A unit whose model has no example left in its fold's training
part measures honesty on a novel device, not accuracy. One camera unit (blink-cam-02) is also held
out of a separate training run entirely, to measure an unseen unit of a known model. The baseline
is a plain random forest over the numeric per-device flow aggregates only. Then the bundled model is
trained on everything and saved with its card (iotscan.detect.modelstore).
"""

from __future__ import annotations

import csv
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iotscan.capture.source import MeterConfig
from iotscan.detect import trees
from iotscan.devices.behaviour import (
    FEATURE_SCHEMA_VERSION,
    NUMERIC_FEATURES,
    DeviceActivity,
    device_features,
    identity_tokens,
)
from iotscan.devices.fingerprint import DeviceEvidence, DeviceModel, fingerprint_devices
from iotscan.devices.signatures import Signatures, load_signatures
from iotscan.devices.stage import DeviceStage
from iotscan.errors import InputError
from iotscan.pipeline import Analysis

DEFAULT_DATA = Path("../shared/datasets")
WINDOW_HOURS = 6.0
FOLDS = 5
SEED = 0
HELD_OUT_UNIT = "oconnor-lab/blink-cam-02"
TREES = 300


@dataclass
class Unit:
    """One evaluation unit: a capture (or a window of one) and its labelled device."""

    name: str
    group: str  # the capture file: units of one group are never split across train and test
    device: str  # the physical device unit ("iot-sentinel/Aria", "oconnor-lab/blink-cam-02")
    mac: str
    model: str
    vendor: str
    device_type: str
    activity: DeviceActivity | None = None
    hints: dict[str, dict[str, int]] | None = None
    ips: list[str] = field(default_factory=list)
    features: dict[str, float] | None = None


class _Discard:
    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self, summary: dict[str, Any]) -> None:
        pass


def profile_capture(path: Path, signatures: Signatures) -> DeviceStage:
    """Run both passes of `iotscan devices` over one capture; the stage holds the profiles."""
    stage = DeviceStage(use_model=False, signatures=signatures)
    analysis = Analysis(_Discard(), stages=[stage], emit_flows=False)
    analysis.run_files([path], MeterConfig(source=""))
    if analysis.state.errors:
        raise InputError(f"{path}: {analysis.state.errors[0]['message']}")
    return stage


def _fill(unit: Unit, stage: DeviceStage, signatures: Signatures) -> Unit:
    activity = stage.profiles().get(unit.mac)
    if activity is not None:
        unit.activity = activity
        unit.hints = stage.hints.by_mac.get(unit.mac)
        unit.ips = list(activity.ips)
        unit.features = device_features(activity, unit.hints, unit.mac, signatures.mac_vendor(unit.mac).org)
    return unit


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except OSError as exc:
        raise InputError(f"{path}: cannot read labels: {exc.strerror or exc}") from exc


def load_units(data: Path, window_hours: float, signatures: Signatures,
               progress: Callable[[str], None] = lambda _: None) -> tuple[list[Unit], dict[str, int]]:
    """Profile every labelled capture; returns the units with a profile and counts of skipped ones."""
    units: list[Unit] = []
    skipped: Counter[str] = Counter()
    sentinel = data / "iot-sentinel"
    for row in _read_csv(sentinel / "devices.csv"):
        folder = sentinel / row["folder"]
        captures = sorted(folder.glob("*.pcap"))
        progress(f"iot-sentinel/{row['folder']}: {len(captures)} captures")
        for capture in captures:
            unit = Unit(name=f"iot-sentinel/{row['folder']}/{capture.name}", group=str(capture),
                        device=f"iot-sentinel/{row['folder']}", mac=row["mac"].lower(), model=row["model"],
                        vendor=row["vendor"], device_type=row["device_type"])
            _fill(unit, profile_capture(capture, signatures), signatures)
            if unit.features is None:
                skipped[unit.device] += 1
            else:
                units.append(unit)
    oconnor = data / "oconnor-lab"
    if shutil.which("editcap") is None:
        raise InputError("editcap (Wireshark's wireshark-common package) is needed to cut the oconnor-lab "
                         "captures into windows: install tshark")
    with tempfile.TemporaryDirectory(prefix="iotscan-windows-") as tmp:
        for row in _read_csv(oconnor / "devices.csv"):
            capture = oconnor / row["capture"]
            stem = capture.stem
            out = Path(tmp) / stem
            out.mkdir()
            subprocess.run(["editcap", "-F", "pcap", "-i", str(int(window_hours * 3600)), str(capture),
                            str(out / "w.pcap")], check=True, capture_output=True)
            windows = sorted(out.glob("w_*.pcap"))
            progress(f"oconnor-lab/{stem}: {len(windows)} windows of {window_hours:g} h")
            for i, window in enumerate(windows):
                if window.stat().st_size <= 24:  # a pcap header and no packet: a gap in the capture
                    continue
                unit = Unit(name=f"oconnor-lab/{stem}@w{i:03d}", group=str(capture),
                            device=f"oconnor-lab/{stem}", mac=row["mac"].lower(), model=row["model"],
                            vendor=row["vendor"], device_type=row["device_type"])
                _fill(unit, profile_capture(window, signatures), signatures)
                if unit.features is None:
                    skipped[unit.device] += 1
                else:
                    units.append(unit)
    return units, dict(skipped)


# -- models ----------------------------------------------------------------------------------------


def _pipeline(seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.pipeline import make_pipeline

    return make_pipeline(DictVectorizer(sparse=False),  # a few hundred columns: dense predicts faster
                         RandomForestClassifier(n_estimators=TREES, class_weight="balanced_subsample",
                                                random_state=seed, n_jobs=1))


def fit_bundle(units: list[Unit], seed: int) -> dict[str, Any]:
    """The device model: a pipeline over device_features() plus what the fusion needs to know."""
    pipeline = _pipeline(seed)
    pipeline.fit([u.features for u in units], [u.model for u in units])
    label_info: dict[str, dict[str, str]] = {}
    label_tokens: dict[str, set[str]] = defaultdict(set)
    for u in units:
        label_info[u.model] = {"vendor": u.vendor, "device_type": u.device_type}
        label_tokens[u.model] |= identity_tokens(u.features or {})
    # the vectorizer's columns and the forest's trees as arrays: scoring does not import scikit-learn
    return {"feature_schema_version": FEATURE_SCHEMA_VERSION, "columns": dict(pipeline[0].vocabulary_),
            "forest": trees.from_random_forest(pipeline[-1]), "label_info": label_info,
            # Sorted tuples, not sets: set order changes with each process's string hashing, and the
            # same data and seed must give the same model file.
            "label_tokens": {k: tuple(sorted(v)) for k, v in sorted(label_tokens.items())},
            "lookalikes": lookalikes(units)}


def lookalikes(units: list[Unit]) -> dict[str, tuple[str, ...]]:
    """Labels whose core self-description is identical: the identity tokens (names, DHCP, mDNS, SSDP,
    domains, JA4, OUI) found in at least half of a label's units are the same set for both."""
    per_label: dict[str, list[set[str]]] = defaultdict(list)
    for u in units:
        per_label[u.model].append(identity_tokens(u.features or {}))
    core: dict[str, frozenset[str]] = {}
    for label, sets in per_label.items():
        counts = Counter(t for tokens in sets for t in tokens)
        core[label] = frozenset(t for t, n in counts.items() if 2 * n >= len(sets))
    twins: dict[str, set[str]] = defaultdict(set)
    for a in core:
        for b in core:
            if a != b and core[a] and core[a] == core[b]:
                twins[a].add(b)
    return {k: tuple(sorted(v)) for k, v in sorted(twins.items())}


def fit_baseline(units: list[Unit], seed: int) -> Any:
    pipeline = _pipeline(seed)
    pipeline.fit([_numeric(u) for u in units], [u.model for u in units])
    return pipeline


def _numeric(u: Unit) -> dict[str, float]:
    features = u.features or {}
    return {k: features[k] for k in NUMERIC_FEATURES}


@dataclass
class Prediction:
    unit: Unit
    fused_model: str | None
    fused_type: str
    confidence: float
    ml_model: str
    baseline_model: str
    known_model: bool  # the unit's model had examples in this training set


def predict_units(bundle: dict[str, Any], baseline: Any, train_models: set[str], units: Iterable[Unit],
                  signatures: Signatures) -> list[Prediction]:
    model = DeviceModel(bundle=bundle, card={}, path=Path("(in training)"))
    units = list(units)
    if not units:
        return []
    records = fingerprint_devices([DeviceEvidence(u.mac, u.activity, u.hints, u.ips) for u in units
                                   if u.activity is not None], signatures, model)
    ml_top = [ranked[0][0] for ranked in model.predict_many([u.features or {} for u in units])]
    base_top = [str(label) for label in baseline.predict([_numeric(u) for u in units])]
    return [Prediction(u, r["model"], r["device_type"], r["confidence"], ml, base, u.model in train_models)
            for u, r, ml, base in zip(units, records, ml_top, base_top, strict=True)]


# -- metrics ----------------------------------------------------------------------------------------


def _macro_f1(truth: list[str], predicted: list[str | None]) -> float:
    from sklearn.metrics import f1_score

    labels = sorted(set(truth))
    return float(f1_score(truth, [p or "(none)" for p in predicted], labels=labels, average="macro",
                          zero_division=0))


def summarise(preds: list[Prediction], label_types: dict[str, str]) -> dict[str, Any]:
    """Type and model accuracy (fused, behaviour model alone, baseline), macro-F1, per-type recall."""
    if not preds:
        return {"units": 0}
    truth_models = [p.unit.model for p in preds]
    truth_types = [p.unit.device_type for p in preds]
    n = len(preds)

    def acc(values: list[Any], truth: list[str]) -> float:
        return round(sum(v == t for v, t in zip(values, truth, strict=True)) / n, 4)

    fused_models = [p.fused_model for p in preds]
    answered = [p for p in preds if p.fused_model]
    per_type: dict[str, dict[str, Any]] = {}
    for t in sorted(set(truth_types)):
        rows = [p for p in preds if p.unit.device_type == t]
        recall = sum(p.fused_type == t for p in rows) / len(rows)
        per_type[t] = {"units": len(rows), "recall": round(recall, 4)}
    return {
        "units": n,
        "type_accuracy": acc([p.fused_type for p in preds], truth_types),
        "model_accuracy": acc(fused_models, truth_models),
        "model_macro_f1": round(_macro_f1(truth_models, fused_models), 4),
        "model_answered": round(len(answered) / n, 4),
        "model_precision_when_answered": round(sum(p.fused_model == p.unit.model for p in answered)
                                               / max(len(answered), 1), 4),
        "behaviour_model_only": {
            "type_accuracy": acc([label_types.get(p.ml_model) for p in preds], truth_types),
            "model_accuracy": acc([p.ml_model for p in preds], truth_models),
            "model_macro_f1": round(_macro_f1(truth_models, [p.ml_model for p in preds]), 4),
        },
        "baseline_random_forest": {
            "type_accuracy": acc([label_types.get(p.baseline_model) for p in preds], truth_types),
            "model_accuracy": acc([p.baseline_model for p in preds], truth_models),
            "model_macro_f1": round(_macro_f1(truth_models, [p.baseline_model for p in preds]), 4),
        },
        "per_type_recall": per_type,
    }


def per_device(preds: list[Prediction], label_types: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    by_device: dict[str, list[Prediction]] = defaultdict(list)
    for p in preds:
        by_device[p.unit.device].append(p)
    for device, items in sorted(by_device.items()):
        n = len(items)
        wrong = Counter(p.fused_model or "(null)" for p in items if p.fused_model != p.unit.model)
        rows.append({
            "device": device,
            "model": items[0].unit.model,
            "device_type": items[0].unit.device_type,
            "units": n,
            "type_accuracy": round(sum(p.fused_type == p.unit.device_type for p in items) / n, 4),
            "model_accuracy": round(sum(p.fused_model == p.unit.model for p in items) / n, 4),
            "behaviour_model_only_model_accuracy": round(sum(p.ml_model == p.unit.model for p in items) / n,
                                                         4),
            "baseline_model_accuracy": round(sum(p.baseline_model == p.unit.model for p in items) / n, 4),
            "baseline_type_accuracy": round(sum(label_types.get(p.baseline_model) == p.unit.device_type
                                                for p in items) / n, 4),
            "model_errors": dict(wrong.most_common(3)),
        })
    return rows


def novel_summary(preds: list[Prediction]) -> list[dict[str, Any]]:
    """Units whose model the fold never saw: a good answer is model null and the right or unknown type."""
    rows = []
    by_device: dict[str, list[Prediction]] = defaultdict(list)
    for p in preds:
        by_device[p.unit.device].append(p)
    for device, items in sorted(by_device.items()):
        n = len(items)
        rows.append({
            "device": device,
            "model": items[0].unit.model,
            "device_type": items[0].unit.device_type,
            "units": n,
            "model_null": round(sum(p.fused_model is None for p in items) / n, 4),
            "model_right_from_signatures": round(sum(p.fused_model == p.unit.model for p in items) / n, 4),
            "type_right": round(sum(p.fused_type == p.unit.device_type for p in items) / n, 4),
            "type_unknown": round(sum(p.fused_type == "unknown" for p in items) / n, 4),
            "answers": dict(Counter(f"{p.fused_type}/{p.fused_model}" for p in items).most_common(3)),
        })
    return rows


# -- the command ------------------------------------------------------------------------------------


def evaluate(units: list[Unit], folds: int, seed: int, signatures: Signatures,
             progress: Callable[[str], None]) -> dict[str, Any]:
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    label_types = {u.model: u.device_type for u in units}
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    y = np.array([u.model for u in units])
    groups = np.array([u.group for u in units])
    preds: list[Prediction] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes with fewer groups than folds: expected
        splits = list(splitter.split(np.zeros(len(units)), y, groups))
    for i, (train_idx, test_idx) in enumerate(splits):
        train = [units[j] for j in train_idx]
        test = [units[j] for j in test_idx]
        assert not {u.group for u in train} & {u.group for u in test}
        bundle = fit_bundle(train, seed)
        baseline = fit_baseline(train, seed)
        preds += predict_units(bundle, baseline, {u.model for u in train}, test, signatures)
        progress(f"fold {i + 1}/{folds}: {len(train)} training units, {len(test)} test units")
    known = [p for p in preds if p.known_model]
    novel = [p for p in preds if not p.known_model]
    twins = lookalikes(units)
    distinct = [p for p in known if p.unit.model not in twins]

    held = [u for u in units if u.device == HELD_OUT_UNIT]
    rest = [u for u in units if u.device != HELD_OUT_UNIT]
    unseen_unit: dict[str, Any] = {"device": HELD_OUT_UNIT, "units": 0}
    if held:
        bundle = fit_bundle(rest, seed)
        baseline = fit_baseline(rest, seed)
        held_preds = predict_units(bundle, baseline, {u.model for u in rest}, held, signatures)
        unseen_unit = {"device": HELD_OUT_UNIT, **summarise(held_preds, label_types),
                       "per_device": per_device(held_preds, label_types)}
        progress(f"held-out unit {HELD_OUT_UNIT}: {len(held)} windows")
    errors = [{"unit": p.unit.name, "truth": p.unit.model, "answer": p.fused_model, "type": p.fused_type,
               "confidence": p.confidence, "behaviour_model": p.ml_model}
              for p in known if p.fused_model != p.unit.model or p.fused_type != p.unit.device_type]
    progress("leave-one-model-out: every model in turn absent from training")
    novel_all: list[Prediction] = []
    for label in sorted(label_types):
        inside = [u for u in units if u.model != label]
        outside = [u for u in units if u.model == label]
        novel_all += predict_units(fit_bundle(inside, seed), fit_baseline(inside, seed),
                                   {u.model for u in inside}, outside, signatures)
    wrong = sum(1 for p in novel_all if p.fused_model and p.fused_model != p.unit.model)
    return {
        "split": f"StratifiedGroupKFold(n_splits={folds}, shuffle=True, random_state={seed}) over "
                 "capture files",
        "known_models": summarise(known, label_types),
        "lookalike_models": {k: list(v) for k, v in twins.items()},
        "known_models_without_lookalikes": summarise(distinct, label_types),
        "known_model_errors": errors[:100],
        "per_device": per_device(known, label_types),
        "novel_models": novel_summary(novel),
        "unseen_unit": unseen_unit,
        "leave_one_model_out": {
            "units": len(novel_all),
            "wrong_model_named": wrong,
            "model_null": sum(1 for p in novel_all if p.fused_model is None),
            "model_named_by_signature": sum(1 for p in novel_all if p.fused_model == p.unit.model),
            "type_right": sum(1 for p in novel_all if p.fused_type == p.unit.device_type),
            "type_unknown": sum(1 for p in novel_all if p.fused_type == "unknown"),
            "per_device": novel_summary(novel_all),
        },
    }


def _versions() -> dict[str, str]:
    import joblib
    import netaddr
    import nfstream
    import numpy
    import sklearn

    return {"python": platform.python_version(), "scikit-learn": sklearn.__version__,
            "numpy": numpy.__version__, "joblib": joblib.__version__, "nfstream": nfstream.__version__,
            "netaddr": netaddr.__version__}


def train(data: Path, out: Path, window_hours: float = WINDOW_HOURS, folds: int = FOLDS, seed: int = SEED,
          evaluate_first: bool = True, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Profile the datasets, evaluate by capture file, train on everything, save model and card."""
    from iotscan.detect.modelstore import save_model

    for sub in ("iot-sentinel/devices.csv", "oconnor-lab/devices.csv"):
        if not (data / sub).is_file():
            raise InputError(f"{data / sub}: not found (point --data at the shared datasets folder)")
    started = time.monotonic()
    signatures = load_signatures()
    units, skipped = load_units(data, window_hours, signatures, progress)
    progress(f"{len(units)} units profiled in {time.monotonic() - started:.0f} s")
    evaluation = evaluate(units, folds, seed, signatures, progress) if evaluate_first else {}
    bundle = fit_bundle(units, seed)
    counts = Counter(u.device for u in units)
    card = {
        "name": "iotscan device model",
        "purpose": "the learned part of device fingerprinting: per-device features -> product model label; "
                   "iotscan/devices/fingerprint.py fuses it with signatures and the MAC vendor",
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "features": "iotscan/devices/behaviour.py device_features(): traffic composition (protocols, service "
                    "ports, nDPI apps, and packet-size, flow-size, duration and inter-flow-gap histograms, all "
                    "as fractions) and generalised self-descriptions (DHCP hostname words with MAC suffixes "
                    "and serials removed, DHCP vendor class and parameter list, mDNS/SSDP values, the model "
                    "and kind announced to a vendor cloud, user agents, JA4, registered domains, IEEE OUI "
                    "organisation); no addresses, MACs or absolute times",
        "estimator": f"DictVectorizer + RandomForestClassifier(n_estimators={TREES}, "
                     "class_weight='balanced_subsample'), stored as the vectorizer's columns and the trees as "
                     "numpy arrays (iotscan.detect.trees): fingerprinting does not import scikit-learn",
        "data": {
            "datasets": ["iot-sentinel (Miettinen et al., ICDCS 2017)",
                         "oconnor-lab (Campos, O'Connor et al., CSET 2021)"],
            "labels": "devices.csv of each dataset; model names verbatim. Two iot-sentinel folders "
                      "(D-LinkDoorSensor, HueSwitch) are radio devices behind a hub and carry the hub's label",
            "window_hours": window_hours,
            "units": len(units),
            "units_per_device": dict(sorted(counts.items())),
            "units_without_device_traffic": skipped,
            "labels_count": len(bundle["label_info"]),
        },
        "evaluation": evaluation,
        "training_command": f"iotscan devices train --data {data} --out {out} "
                            f"--window-hours {window_hours:g} --folds {folds} --seed {seed}",
        "versions": _versions(),
        "limitations": [
            "One pair of models is a look-alike in this data: iKettle 2.0 / SmarterCoffee. Their setup "
            "captures are the same 11 packets (EAPOL, DHCP, ARP, IGMP; same ESP8266 firmware, DHCP options "
            "and timing), byte for byte apart from the MAC, the MAC-derived hostname, nonces and checksums. "
            "Nothing that generalises separates them, so iotscan names the vendor and type and leaves the "
            "model null, with an ambiguous_model evidence; that is all of the fused model-accuracy gap. The "
            "behaviour model alone guesses between the twins (right for 10 of their 29 units here), which is "
            "how it scores higher on model accuracy than the fused answer.",
            "Edimax SP-1101W / SP-2101W share firmware, DHCP and cloud domains; the model each plug "
            "announces in its (bit-rotated) hello to the Edimax cloud on UDP 8765 tells them apart, read "
            "by the identity pass. Captures that miss that hello would leave them look-alikes again.",
            "Training data are setup captures of 27 devices and week-long captures of 4; devices of other "
            "models get a type from signatures and the MAC vendor, and a model only when a signature names "
            "it (see leave-one-model-out).",
            "Signatures (iotscan/data/device_signatures.json) were written with these captures visible; "
            "the behaviour-model-alone figures are the learned part alone, measured on held-out captures.",
        ],
    }
    card["seconds_to_train"] = round(time.monotonic() - started, 1)
    digest = save_model(bundle, out, card, card_markdown(card))
    progress(f"saved {out} (SHA-256 {digest[:16]}...)")
    return card


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _accuracy_table(k: dict[str, Any]) -> list[str]:
    rows = [("iotscan (fused)", k), ("behaviour model alone", k["behaviour_model_only"]),
            ("baseline: plain random forest over flow aggregates", k["baseline_random_forest"])]
    return ["| | type accuracy | model accuracy | model macro-F1 |", "|---|---|---|---|"] + [
        f"| {name} | {_pct(r['type_accuracy'])} | {_pct(r['model_accuracy'])} | {r['model_macro_f1']:.3f} |"
        for name, r in rows]


def _novel_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| device | true model | units | model null | model named by a signature | type right | "
             "type unknown | answers |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        answers = "; ".join(f"{a} x{c}" for a, c in row["answers"].items())
        lines.append(f"| {row['device']} | {row['model']} | {row['units']} | {_pct(row['model_null'])} | "
                     f"{_pct(row['model_right_from_signatures'])} | {_pct(row['type_right'])} | "
                     f"{_pct(row['type_unknown'])} | {answers} |")
    return lines


def card_markdown(card: dict[str, Any]) -> str:
    data = card["data"]
    lines = [f"# {card['name']}", "", card["purpose"] + ".", "",
             f"Estimator: {card['estimator']}. Feature schema {card['feature_schema_version']}.", "",
             f"Features: {card['features']}.", "", "## Data", ""]
    lines += [f"- {d}" for d in data["datasets"]]
    lines += [f"- labels: {data['labels']}; {data['labels_count']} model labels",
              f"- {data['units']} units: one per iot-sentinel capture file, one per {data['window_hours']:g}-hour "
              "window of the week-long oconnor-lab captures (empty windows, gaps in the capture, are dropped)",
              f"- windows without traffic of the labelled device (skipped): {data['units_without_device_traffic']}",
              ""]
    ev = card.get("evaluation") or {}
    if ev:
        k = ev["known_models"]
        d = ev["known_models_without_lookalikes"]
        lines += ["## Evaluation on unseen captures", "",
                  f"Split: {ev['split']}; the windows of one capture stay in one fold. Figures are over the "
                  f"{k['units']} units whose model had examples in the fold's training part.", ""]
        lines += _accuracy_table(k)
        lines += ["", f"The fused answer names a model for {_pct(k['model_answered'])} of the units and is "
                  f"right for {_pct(k['model_precision_when_answered'])} of those: every miss is a null "
                  "answer on a look-alike pair (" + "; ".join(
                      f"{a} / {b}" for a, bs in ev["lookalike_models"].items() for b in bs if a < b) + ").",
                  "", f"Without the look-alike pairs ({d['units']} units): type accuracy "
                  f"{_pct(d['type_accuracy'])}, model accuracy {_pct(d['model_accuracy'])} (behaviour model "
                  f"alone {_pct(d['behaviour_model_only']['model_accuracy'])}, baseline "
                  f"{_pct(d['baseline_random_forest']['model_accuracy'])}).", "",
                  "Per-type recall (fused): " + ", ".join(f"{t} {_pct(v['recall'])} ({v['units']})"
                                                          for t, v in k["per_type_recall"].items()), "",
                  "### Per device", "",
                  "| device | model | units | type acc | model acc | behaviour model alone | baseline model | "
                  "wrong or null answers |", "|---|---|---|---|---|---|---|---|"]
        for row in ev["per_device"]:
            errors = "; ".join(f"{m} x{c}" for m, c in row["model_errors"].items())
            lines.append(f"| {row['device']} | {row['model']} | {row['units']} | {_pct(row['type_accuracy'])} "
                         f"| {_pct(row['model_accuracy'])} | "
                         f"{_pct(row['behaviour_model_only_model_accuracy'])} | "
                         f"{_pct(row['baseline_model_accuracy'])} | {errors} |")
        u = ev["unseen_unit"]
        lines += ["", f"### Unseen unit of a known model: {u['device']}", "",
                  f"Trained without any window of {u['device']} (its sibling unit stays in training), then "
                  f"asked about its {u.get('units', 0)} windows."]
        if u.get("units"):
            lines += ["", f"Type accuracy {_pct(u['type_accuracy'])}, model accuracy "
                      f"{_pct(u['model_accuracy'])} (behaviour model alone "
                      f"{_pct(u['behaviour_model_only']['model_accuracy'])}, baseline "
                      f"{_pct(u['baseline_random_forest']['model_accuracy'])})."]
        lines += ["", "### Novel devices in the cross-validation", "",
                  "Single-capture units whose model has no other unit (the whole capture is in one fold):", ""]
        lines += _novel_table(ev["novel_models"])
        lomo = ev["leave_one_model_out"]
        lines += ["", "### Leave one model out: honesty about devices it does not know", "",
                  f"Each model in turn is removed from training and its {lomo['units']} units are asked about. "
                  f"A model was named for {lomo['units'] - lomo['model_null']} of them: "
                  f"{lomo['model_named_by_signature']} right (a signature names the product) and "
                  f"{lomo['wrong_model_named']} wrong (the look-alike twin of the missing model). Type right "
                  f"for {lomo['type_right']}, 'unknown' for {lomo['type_unknown']}.", ""]
        lines += _novel_table(lomo["per_device"])
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card["limitations"]]
    lines += ["", "## Reproduce", "", f"    {card['training_command']}", "",
              f"Took {card.get('seconds_to_train', 0):.0f} s. Versions: "
              + ", ".join(f"{k} {v}" for k, v in card["versions"].items()) + "."]
    return "\n".join(lines)
