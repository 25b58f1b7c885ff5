"""Training the device model: `iotscan devices train`.

Data: ../shared/datasets/iot-sentinel/ (one folder of setup captures per device; devices.csv gives
the MAC, vendor, model and type) and ../shared/datasets/oconnor-lab/ (week-long captures of one
device each, cut into time windows with editcap). Every capture or window is profiled by the same
code as `iotscan devices` (Analysis + DeviceStage, both passes), and the labelled MAC's profile
becomes one example. Devices of the same models labelled in other datasets of ../shared
(OTHER_DEVICES) are profiled too, for evaluation only.

The model is two random forests: device features -> product model (named when the device looks like
one seen), and behaviour alone -> device type (a hint for models never seen). It is evaluated
(iotscan/training/device_eval.py), trained on everything and saved with its card
(iotscan.detect.modelstore; the Markdown by iotscan/training/device_card.py).
"""

from __future__ import annotations

import csv
import platform
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iotscan.capture.source import MeterConfig
from iotscan.detect import trees
from iotscan.devices.behaviour import (
    FEATURE_SCHEMA_VERSION,
    NUMERIC_FEATURES,
    DeviceActivity,
    behaviour_only,
    device_features,
    identity_tokens,
)
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


@dataclass(frozen=True)
class OtherDevice:
    """A labelled device of one of the datasets' models in another dataset of ../shared: evaluation only."""

    captures: str  # glob under the data folder
    mac: str
    vendor: str
    model: str
    device_type: str
    label: str  # where the label comes from


OTHER_DEVICES = (
    OtherDevice("iot-23/CTU-Honeypot-Capture-4-1/*.pcap", "00:17:88:75:b3:82", "Philips", "Philips Hue bridge", "hub",
                "MANIFEST.csv: a real Philips Hue bridge (192.168.1.132) on a honeypot network; IoT-23's README: "
                "Philips hue Bridge"),
    OtherDevice("mudscope/tue-tplink/*.pcap", "68:ff:7b:df:58:4d", "TP-Link", "TP-Link HS110 smart plug", "smart_plug",
                "MANIFEST.csv: the TP-Link plug 192.168.10.206; MUDscope's config names 68:ff:7b:df:58:4d "
                "tue-tplink-plug; the model from its DHCP hostname, HS110"),
)


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


def _windows(capture: Path, tmp: Path, window_hours: float) -> list[tuple[int, Path]]:
    """A long capture cut into windows with editcap: (index, file), empty windows (gaps) dropped."""
    if shutil.which("editcap") is None:
        raise InputError("editcap (Wireshark's wireshark-common package) is needed to cut long captures into "
                         "windows: install tshark")
    out = tmp / capture.stem
    out.mkdir()
    subprocess.run(["editcap", "-F", "pcap", "-i", str(int(window_hours * 3600)), str(capture),
                    str(out / "w.pcap")], check=True, capture_output=True)
    # a pcap header and no packet: a gap in the capture
    return [(i, w) for i, w in enumerate(sorted(out.glob("w_*.pcap"))) if w.stat().st_size > 24]


def load_other_units(data: Path, window_hours: float, signatures: Signatures,
                     progress: Callable[[str], None] = lambda _: None) -> list[Unit]:
    """The OTHER_DEVICES found under ``data`` (none when their datasets are absent): one unit per capture, or
    per window of a capture longer than a window."""
    units = []
    with tempfile.TemporaryDirectory(prefix="iotscan-windows-") as tmp:
        for other in OTHER_DEVICES:
            captures = sorted(data.glob(other.captures))
            device = f"{other.captures.split('/')[0]}/{other.mac}"
            for capture in captures:
                parts = _windows(capture, Path(tmp), window_hours)
                for i, part in parts:
                    unit = Unit(name=f"{device}/{capture.name}@w{i:03d}", group=str(capture), device=device,
                                mac=other.mac, model=other.model, vendor=other.vendor, device_type=other.device_type)
                    _fill(unit, profile_capture(part, signatures), signatures)
                    if unit.features is not None:
                        units.append(unit)
            if captures:
                progress(f"{device} ({other.model}): {sum(u.device == device for u in units)} units, evaluation only")
    return units


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
    with tempfile.TemporaryDirectory(prefix="iotscan-windows-") as tmp:
        for row in _read_csv(data / "oconnor-lab" / "devices.csv"):
            capture = data / "oconnor-lab" / row["capture"]
            windows = _windows(capture, Path(tmp), window_hours)
            progress(f"oconnor-lab/{capture.stem}: {len(windows)} windows of {window_hours:g} h")
            for i, window in windows:
                unit = Unit(name=f"oconnor-lab/{capture.stem}@w{i:03d}", group=str(capture),
                            device=f"oconnor-lab/{capture.stem}", mac=row["mac"].lower(), model=row["model"],
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
    """The device model: a pipeline over device_features() plus what the fusion needs to know, and the type
    model (behaviour_only() features -> device type)."""
    pipeline = _pipeline(seed)
    pipeline.fit([u.features for u in units], [u.model for u in units])
    type_pipeline = fit_type_model(units, seed)
    label_info: dict[str, dict[str, str]] = {}
    label_tokens: dict[str, set[str]] = defaultdict(set)
    for u in units:
        label_info[u.model] = {"vendor": u.vendor, "device_type": u.device_type}
        label_tokens[u.model] |= identity_tokens(u.features or {})
    # the vectorizer's columns and the forest's trees as arrays: scoring does not import scikit-learn
    return {"feature_schema_version": FEATURE_SCHEMA_VERSION, "columns": dict(pipeline[0].vocabulary_),
            "forest": trees.from_random_forest(pipeline[-1]), "label_info": label_info,
            "type_columns": dict(type_pipeline[0].vocabulary_),
            "type_forest": trees.from_random_forest(type_pipeline[-1]),
            # Sorted tuples, not sets: set order changes with each process's string hashing, and the
            # same data and seed must give the same model file.
            "label_tokens": {k: tuple(sorted(v)) for k, v in sorted(label_tokens.items())},
            "lookalikes": lookalikes(units)}


def fit_type_model(units: list[Unit], seed: int) -> Any:
    """Device type from behaviour alone (no names, domains or OUI: they do not carry over to other models).
    Each model weighs the same, however many captures it has: what is learnt is a type, not a model."""
    per_model = Counter(u.model for u in units)
    pipeline = _pipeline(seed)
    pipeline.fit([behaviour_only(u.features or {}) for u in units], [u.device_type for u in units],
                 randomforestclassifier__sample_weight=[1.0 / per_model[u.model] for u in units])
    return pipeline


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
    pipeline.fit([numeric_only(u) for u in units], [u.model for u in units])
    return pipeline


def numeric_only(u: Unit) -> dict[str, float]:
    features = u.features or {}
    return {k: features[k] for k in NUMERIC_FEATURES}


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
    """Profile the datasets, evaluate (by capture file; by model left out), train on everything, save model
    and card."""
    from iotscan.detect.modelstore import save_model
    from iotscan.training.device_card import card_markdown
    from iotscan.training.device_eval import evaluate

    for sub in ("iot-sentinel/devices.csv", "oconnor-lab/devices.csv"):
        if not (data / sub).is_file():
            raise InputError(f"{data / sub}: not found (point --data at the shared datasets folder)")
    started = time.monotonic()
    signatures = load_signatures()
    units, skipped = load_units(data, window_hours, signatures, progress)
    others = load_other_units(data, window_hours, signatures, progress) if evaluate_first else []
    progress(f"{len(units)} units profiled in {time.monotonic() - started:.0f} s")
    evaluation = evaluate(units, folds, seed, signatures, progress, others) if evaluate_first else {}
    bundle = fit_bundle(units, seed)
    counts = Counter(u.device for u in units)
    card = {
        "name": "iotscan device model",
        "purpose": "the learned part of device fingerprinting: per-device features -> product model label, and "
                   "behaviour -> device type for models not seen; iotscan/devices/fingerprint.py fuses them with "
                   "the signature data and the MAC vendor",
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "features": "iotscan/devices/behaviour.py device_features(): traffic composition (protocols, service "
                    "ports, nDPI apps, and packet-size, flow-size, duration and inter-flow-gap histograms, all "
                    "as fractions) and generalised self-descriptions (DHCP hostname words with MAC suffixes "
                    "and serials removed, DHCP vendor class and parameter list, mDNS/SSDP values, the model "
                    "and kind announced to a vendor cloud, user agents, JA4, registered domains, IEEE OUI "
                    "organisation); no addresses, MACs or absolute times. The type model reads the traffic "
                    "composition only (behaviour_only(): no names, domains or OUI)",
        "estimator": f"DictVectorizer + RandomForestClassifier(n_estimators={TREES}, "
                     "class_weight='balanced_subsample') for the model label; the same for the device type, each "
                     "model weighing the same whatever its number of captures; stored as the vectorizers' "
                     "columns and the trees as numpy arrays (iotscan.detect.trees): fingerprinting does not "
                     "import scikit-learn",
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
            "other_networks": [{"captures": o.captures, "model": o.model, "label": o.label,
                                "units": sum(u.mac == o.mac for u in others)} for o in OTHER_DEVICES],
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
            "behaviour model alone guesses between the twins, which is how it scores higher on model accuracy "
            "than the fused answer.",
            "Edimax SP-1101W / SP-2101W share firmware, DHCP and cloud domains; the model each plug "
            "announces in its (bit-rotated) hello to the Edimax cloud on UDP 8765 tells them apart, read "
            "by the identity pass. Captures that miss that hello would leave them look-alikes again.",
            "Models not seen: 28 models are few to learn a type from behaviour (the type model alone is right "
            "for less than half of the captures of a model left out), so a type for them comes from generic "
            "knowledge (iotscan/data/device_types.json): what the MAC's maker makes, product-kind and "
            "product-line words in names, services. A device with none of it stays unknown, with its "
            "type_guess: here the D-Link DCH sensors and siren (one platform, model codes of a line that mixes "
            "sensors, sirens and a hub), the Ednet camera and gateway, and the Lockly hub (Wi-Fi module "
            "defaults only).",
            "HomeMaticPlug (labelled the HMIP-PS plug) shows an eQ-3 MAC talking to a cloud; the HMIP-PS is an "
            "868 MHz radio plug without Wi-Fi or Ethernet, so the device in these captures is most likely its "
            "Homematic IP access point, and left out it is typed hub: counted wrong, the label kept as given.",
            "The product signatures (iotscan/data/device_signatures.json) were written with these captures "
            "visible: each lists the models it was written with ('models'), and leave-one-model-out drops "
            "them. The generic type evidence cites its sources; the behaviour-model-alone figures are the "
            "learned part alone, measured on held-out captures.",
        ],
    }
    card["seconds_to_train"] = round(time.monotonic() - started, 1)
    digest = save_model(bundle, out, card, card_markdown(card))
    progress(f"saved {out} (SHA-256 {digest[:16]}...)")
    return card
