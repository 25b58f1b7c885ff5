"""Honest evaluation: metrics per capture and per flow, grouped cross-validation, leave one source out.

Every figure is computed on captures the model under test never saw (split by capture, never by
row), for the flow model and for two baselines: a random forest on per-flow NFStream statistics
(what a new user would train) and the rule "flows of fewer than 3 packets are attacks".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from iotscan.detect.scoring import attack_families, attack_scores
from iotscan.training.dataset import CaptureTable
from iotscan.training.manifest import FAMILIES
from iotscan.training.train import (
    TrainConfig,
    encoded,
    file_groups,
    fit_flow_model,
    fit_statistics_forest,
    forest_predict,
    group_folds,
)

CLASSES = ["benign", *FAMILIES]
MODELS = ("model", "forest", "rule")
OPERATING_POINTS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
MODEL_TITLES = {"model": "flow model (context + per-flow)", "forest": "random forest, per-flow statistics only",
                "rule": "rule: fewer than 3 packets = attack"}


@dataclass
class Predictions:
    """Scores, verdicts and families of every labeled flow of some captures, by one model."""

    capture: list[str]  # capture name per table (a file's path, with its row when several rows share it)
    source: list[str]
    y: list[np.ndarray]
    family: list[np.ndarray]
    attack: list[np.ndarray]  # predicted verdict
    predicted_family: list[np.ndarray]
    score: list[np.ndarray]


def _empty() -> Predictions:
    return Predictions([], [], [], [], [], [], [])


def _add(p: Predictions, table: CaptureTable, score: np.ndarray, attack: np.ndarray, fam: np.ndarray) -> None:
    keep = table.y >= 0
    p.capture.append(table.spec.name)
    p.source.append(table.spec.source)
    p.y.append(table.y[keep])
    p.family.append(np.asarray(table.family[keep], dtype=object))
    p.attack.append(attack[keep])
    p.predicted_family.append(np.where(attack[keep], fam[keep], ""))
    p.score.append(score[keep])


def predict_model(model: dict[str, Any], table: CaptureTable, threshold: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = encoded(table, model["vocabulary"])
    score = attack_scores(model, X)
    attack = score >= (model["threshold"] if threshold is None else threshold)
    fam = np.full(len(X), "", dtype=object)
    if attack.any():
        fam[attack] = attack_families(model, X[attack])
    return score, attack, fam


def predict_all(tables: Sequence[CaptureTable], model: dict[str, Any] | None, forest: dict[str, Any] | None,
                into: dict[str, Predictions], threshold: float | None = None) -> None:
    for t in tables:
        if model is not None:
            _add(into["model"], t, *predict_model(model, t, threshold))
        if forest is not None:
            score, fam = forest_predict(forest, t.X)
            _add(into["forest"], t, score, score >= 0.5, fam)
        short = (t.packets < 3)
        _add(into["rule"], t, short.astype(float), short, np.full(len(t.X), "", dtype=object))


def metrics(p: Predictions) -> dict[str, Any]:
    """The card's figures for one set of predictions."""
    per_capture = []
    for cap, src, y, fam, att, pfam in zip(p.capture, p.source, p.y, p.family, p.attack, p.predicted_family,
                                           strict=True):
        entry: dict[str, Any] = {"capture": cap, "source": src, "flows": len(y), "attack_flows": int((y == 1).sum())}
        if (y == 1).any():
            detected = att & (y == 1)
            entry["attack_recall"] = float(detected.sum() / (y == 1).sum())
            fams = fam[y == 1]
            entry["family"] = max(set(fams.tolist()), key=fams.tolist().count)
            entry["family_accuracy"] = float(np.mean(pfam[detected] == fam[detected])) if detected.any() else None
        if (y == 0).any():
            entry["benign_flows"] = int((y == 0).sum())
            entry["false_positives"] = int((att & (y == 0)).sum())
        per_capture.append(entry)
    y = np.concatenate(p.y) if p.y else np.empty(0)
    fam = np.concatenate(p.family) if p.family else np.empty(0, object)
    att = np.concatenate(p.attack) if p.attack else np.empty(0, bool)
    pfam = np.concatenate(p.predicted_family) if p.predicted_family else np.empty(0, object)
    attack_caps = [e for e in per_capture if "attack_recall" in e]
    fam_caps = [e for e in attack_caps if e.get("family_accuracy") is not None]
    benign = y == 0
    detected = att & (y == 1)
    truth = np.where(y == 1, fam, "benign")
    pred = np.where(att, pfam, "benign")
    pred = np.where(pred == "", "unknown", pred)
    out: dict[str, Any] = {
        "captures": len(per_capture),
        "attack_captures": len(attack_caps),
        "flows": len(y),
        "attack_recall_per_capture": _mean([e["attack_recall"] for e in attack_caps]),
        "attack_recall_per_flow": float(detected.sum() / max((y == 1).sum(), 1)) if (y == 1).any() else None,
        "benign_fpr_per_flow": float(np.mean(att[benign])) if benign.any() else None,
        "benign_flows": int(benign.sum()),
        "family_accuracy_per_capture": _mean([e["family_accuracy"] for e in fam_caps]),
        "family_accuracy_per_flow": float(np.mean(pfam[detected] == fam[detected])) if detected.any() else None,
    }
    present = [c for c in CLASSES if np.any(truth == c)]
    per_class = {}
    f1s = []
    for c in present:
        tp = int(np.sum((truth == c) & (pred == c)))
        fp = int(np.sum((truth != c) & (pred == c)))
        fn = int(np.sum((truth == c) & (pred != c)))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                        "support": int(np.sum(truth == c))}
        f1s.append(f1)
    out["per_class"] = per_class
    out["macro_f1"] = float(np.mean(f1s)) if f1s else None
    labels = present + sorted(set(pred.tolist()) - set(present))
    out["confusion"] = {"labels": labels, "matrix": [[int(np.sum((truth == a) & (pred == b))) for b in labels]
                                                     for a in labels]}
    per_family = {}
    for f in FAMILIES:
        caps = [e for e in attack_caps if e["family"] == f]
        if caps:
            per_family[f] = {"captures": len(caps), "attack_flows": sum(e["attack_flows"] for e in caps),
                             "attack_recall_per_capture": _mean([e["attack_recall"] for e in caps]),
                             "family_accuracy_per_capture": _mean([e["family_accuracy"] for e in caps
                                                                   if e.get("family_accuracy") is not None])}
    out["per_family"] = per_family
    # the same captures at other thresholds: the trade-off a user makes with --threshold
    scores = np.concatenate(p.score) if p.score else np.empty(0)
    points = []
    for t in OPERATING_POINTS:
        flagged = scores >= t
        recalls = [float(np.mean(sc[yy == 1] >= t)) for sc, yy in zip(p.score, p.y, strict=True) if (yy == 1).any()]
        points.append({"threshold": t, "attack_recall_per_capture": _mean(recalls),
                       "benign_fpr_per_flow": float(np.mean(flagged[benign])) if benign.any() else None})
    out["operating_points"] = points
    per_source = {}
    for src in sorted({e["source"] for e in per_capture}):
        caps = [e for e in per_capture if e["source"] == src]
        benign_flows = sum(e.get("benign_flows", 0) for e in caps)
        per_source[src] = {
            "captures": len(caps),
            "attack_recall_per_capture": _mean([e["attack_recall"] for e in caps if "attack_recall" in e]),
            "benign_fpr_per_flow": sum(e.get("false_positives", 0) for e in caps) / benign_flows
            if benign_flows else None,
            "family_accuracy_per_capture": _mean([e["family_accuracy"] for e in caps
                                                  if e.get("family_accuracy") is not None])}
    out["per_source"] = per_source
    out["per_capture"] = per_capture
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _run_split(tables: Sequence[CaptureTable], splits: list[tuple[str, np.ndarray]], cfg: TrainConfig,
               say: Callable[[str], None], baselines: bool) -> dict[str, Any]:
    preds = {m: _empty() for m in MODELS}
    folds = []
    for name, test_idx in splits:
        test_set = set(test_idx.tolist())
        train = [t for i, t in enumerate(tables) if i not in test_set]
        test = [tables[i] for i in sorted(test_set)]
        if not any(np.any(t.y == 1) for t in train) or not any(np.any(t.y == 0) for t in train):
            say(f"{name}: skipped (training part lacks benign or attack flows)")
            continue
        say(f"{name}: training on {len(train)} captures, testing on {len(test)}")
        model = fit_flow_model(train, cfg)
        forest = fit_statistics_forest(train, cfg) if baselines else None
        predict_all(test, model, forest, preds)
        folds.append({"name": name, "test_captures": len(test), "threshold": model["threshold"],
                      "families_trained": model["families"]})
    result = {"folds": folds}
    for m in MODELS:
        if preds[m].capture:
            result[m] = metrics(preds[m])
    return result


def grouped_cv(tables: Sequence[CaptureTable], cfg: TrainConfig = TrainConfig(), k: int = 5,
               say: Callable[[str], None] = print, baselines: bool = True) -> dict[str, Any]:
    """k-fold cross-validation grouped by capture file (attack and benign captures spread over folds)."""
    # the rows of one file (flow filters) go to one fold: never test on a file the model trained on
    group = file_groups(tables)
    has_attack = np.zeros(len(tables), dtype=bool)
    np.logical_or.at(has_attack, group, [bool(np.any(t.y == 1)) for t in tables])
    folds = group_folds(group, has_attack, k, cfg.seed + 1)
    splits = [(f"fold {i + 1}/{k}", np.flatnonzero(np.isin(group, f))) for i, f in enumerate(folds)]
    out = _run_split(tables, splits, cfg, say, baselines)
    out["k"] = k
    return out


def leave_one_source_out(tables: Sequence[CaptureTable], cfg: TrainConfig = TrainConfig(),
                         say: Callable[[str], None] = print, baselines: bool = True) -> dict[str, Any]:
    """Train on every source but one, test on the one left out; figures pooled over all held-out sources."""
    sources = sorted({t.spec.source for t in tables})
    splits = [(f"without {s}", np.array([i for i, t in enumerate(tables) if t.spec.source == s])) for s in sources]
    out = _run_split(tables, splits, cfg, say, baselines)
    out["sources"] = sources
    return out
