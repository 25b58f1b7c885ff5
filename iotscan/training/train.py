"""Training: feature tables of labeled captures -> the flow model (a dict joblib stores).

Reproducible: fixed seeds, the pinned FEATURE_NAMES, deterministic row sampling and a single
thread for the random forest baseline. Captures are weighted so that one huge flood does not drown
the rest: a capture's rows weigh sqrt(flows) in total, every attack family carries the same
total weight, and attacks together weigh as much as benign traffic. At most
``max_rows_per_capture`` rows of a capture are used (a seeded sample), with weights rescaled.

The decision threshold and the calibration are fitted on out-of-fold scores of an inner
cross-validation grouped by capture over the training captures only: never on test data.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from iotscan.detect import trees
from iotscan.detect.features import (
    DETECTOR_FEATURES,
    FEATURE_NAMES,
    FEATURE_SCHEMA_VERSION,
    METER_SETTINGS,
    REASON_GROUPS,
    STATISTICS_FEATURES,
    apply_vocabulary,
    build_vocabulary,
    feature_index,
)
from iotscan.training.dataset import CaptureTable
from iotscan.training.manifest import FAMILIES

FAMILY_ORDER = list(FAMILIES)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 20240601
    max_rows_per_capture: int = 3000
    max_iter: int = 40  # small trees, few of them: scoring cost grows with both (80 did no better across sources)
    learning_rate: float = 0.2
    max_leaf_nodes: int = 15
    family_trees: int = 50
    min_samples_leaf: int = 20
    l2_regularization: float = 1.0
    inner_folds: int = 4
    target_fpr: float = 0.01  # benign false positives per flow allowed on validation data (the target)
    min_threshold: float = 0.2
    max_threshold: float = 0.995


@dataclass
class Rows:
    """Training rows drawn from capture tables."""

    X: np.ndarray
    y: np.ndarray  # 1 attack, 0 benign
    family: np.ndarray  # family names ("" benign)
    capture: np.ndarray  # index of the capture in the tables list
    weight: np.ndarray
    has_attack: np.ndarray  # per capture: does it hold labeled attack flows


def capture_vocabulary(tables: Sequence[CaptureTable]) -> dict[str, list[str]]:
    apps, cats, groups = [], [], []
    for i, t in enumerate(tables):
        keep = t.y >= 0
        apps.extend(t.apps[keep].tolist())
        cats.extend(t.categories[keep].tolist())
        groups.extend([i] * int(keep.sum()))
    return build_vocabulary(apps, cats, groups)


def encoded(table: CaptureTable, vocabulary: dict[str, list[str]]) -> np.ndarray:
    """The table's feature rows with the vocabulary's app and category codes."""
    X = table.X.copy()
    apply_vocabulary(X, list(zip(table.apps.tolist(), table.categories.tolist(), strict=True)), vocabulary)
    return X


def draw_rows(tables: Sequence[CaptureTable], vocabulary: dict[str, list[str]], cfg: TrainConfig) -> Rows:
    rng = np.random.default_rng(cfg.seed)
    Xs, ys, fams, caps, ws = [], [], [], [], []
    for i, t in enumerate(tables):
        labeled = np.flatnonzero(t.y >= 0)
        if len(labeled) == 0:
            continue
        keep = labeled
        if len(keep) > cfg.max_rows_per_capture:
            keep = np.sort(rng.choice(labeled, cfg.max_rows_per_capture, replace=False))
        X = encoded(t, vocabulary)[keep]
        # a capture weighs sqrt(its labeled flows) in total, spread over the rows drawn
        Xs.append(X)
        ys.append(t.y[keep].astype(np.int8))
        fams.append(np.asarray(t.family[keep], dtype=object))
        caps.append(np.full(len(keep), i))
        ws.append(np.full(len(keep), np.sqrt(len(labeled)) / len(keep)))
    y = np.concatenate(ys)
    family = np.concatenate(fams)
    family[y == 0] = ""
    weight = np.concatenate(ws)
    # every attack family the same total, attacks together as much as benign
    attack_total = benign_total = weight[y == 0].sum()
    present = [f for f in FAMILY_ORDER if np.any((y == 1) & (family == f))]
    for f in present:
        m = (y == 1) & (family == f)
        weight[m] *= attack_total / len(present) / weight[m].sum()
    weight *= len(weight) / (benign_total * 2)  # mean weight ~1
    capture = np.concatenate(caps)
    has_attack = np.array([bool(np.any(t.y == 1)) for t in tables])
    return Rows(np.concatenate(Xs), y, family, capture, weight, has_attack)


def fit_weighted(estimator: Any, X: np.ndarray, y: np.ndarray, weight: np.ndarray, seed: int) -> Any:
    """Fit on rows drawn with probability proportional to their weight (a seeded draw of as many rows).

    Equivalent in expectation to sample weights, and far faster: scikit-learn's gradient boosting bins
    weighted data with one weighted percentile per bin edge and feature (minutes on these tables).
    """
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(y), size=len(y), replace=True, p=weight / weight.sum()))
    return estimator.fit(X[idx], y[idx])


def _detector(cfg: TrainConfig) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=cfg.max_iter, learning_rate=cfg.learning_rate, max_leaf_nodes=cfg.max_leaf_nodes,
        min_samples_leaf=cfg.min_samples_leaf, l2_regularization=cfg.l2_regularization,
        early_stopping=False, random_state=cfg.seed)


def file_groups(tables: Sequence[CaptureTable]) -> np.ndarray:
    """Per table, the index of the first table of the same file: the rows (flow filters) of one file form
    one group for splitting; without such rows it is the tables' own index."""
    first: dict[str, int] = {}
    return np.array([first.setdefault(str(t.spec.path), i) for i, t in enumerate(tables)], dtype=int)


def group_folds(capture: np.ndarray, has_attack: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k folds of captures (as arrays of capture indices), attack and benign captures spread evenly."""
    rng = np.random.default_rng(seed)
    caps = np.unique(capture)
    folds: list[list[int]] = [[] for _ in range(k)]
    for flag in (True, False):
        members = caps[has_attack[caps] == flag]
        members = members[rng.permutation(len(members))]
        # largest first, each to the fold with the fewest rows so far: folds of similar size
        sizes = np.bincount(capture, minlength=len(has_attack))
        for c in sorted(members.tolist(), key=lambda c: -sizes[c]):
            target = min(range(k), key=lambda f: (sum(sizes[x] for x in folds[f] if has_attack[x] == flag), f))
            folds[target].append(c)
    return [np.array(sorted(f), dtype=int) for f in folds]


def _calibration(raw: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Platt scaling of the detector's out-of-fold probabilities, as a curve for np.interp.

    A sigmoid of the logit keeps the detector's ranking (isotonic regression on out-of-source scores
    collapses it into a few steps, leaving no threshold between "flag everything" and "nothing").
    """
    from sklearn.linear_model import LogisticRegression

    eps = 1e-6
    logit = np.log(np.clip(raw, eps, 1 - eps) / (1 - np.clip(raw, eps, 1 - eps)))
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(logit[:, None], y, sample_weight=w)
    a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    if a <= 0:  # no usable ranking: keep the detector's own probabilities
        a, b = 1.0, 0.0
    grid = np.concatenate([np.linspace(-14.0, 14.0, 2801)])  # logits of raw probabilities
    xs = 1.0 / (1.0 + np.exp(-grid))
    ys = 1.0 / (1.0 + np.exp(-(a * grid + b)))
    return xs, ys


def choose_threshold(scores: np.ndarray, y: np.ndarray, capture: np.ndarray, cfg: TrainConfig,
                     validation: str) -> dict[str, Any]:
    """The lowest threshold whose benign false-positive rate per flow on validation rows is at most
    ``target_fpr`` (within [min_threshold, max_threshold]); maximises recall under that bound."""
    candidates = np.unique(np.concatenate([np.round(scores, 4), [cfg.min_threshold, cfg.max_threshold]]))
    candidates = candidates[(candidates >= cfg.min_threshold) & (candidates <= cfg.max_threshold)]
    benign = scores[y == 0]
    chosen = cfg.max_threshold
    for t in candidates:  # ascending
        if benign.size == 0 or np.mean(benign >= t) <= cfg.target_fpr:
            chosen = float(t)
            break
    attack_caps = np.unique(capture[y == 1])
    recalls = [float(np.mean(scores[(capture == c) & (y == 1)] >= chosen)) for c in attack_caps]
    return {"threshold": round(chosen, 4),
            "rule": f"lowest threshold in [{cfg.min_threshold}, {cfg.max_threshold}] with benign false-positive "
                    f"rate <= {cfg.target_fpr:.2%} of flows on out-of-fold validation scores ({validation}; "
                    "training data only, never test data)",
            "validation_benign_fpr": float(np.mean(benign >= chosen)) if benign.size else None,
            "validation_attack_recall_per_capture": float(np.mean(recalls)) if recalls else None}


def fit_flow_model(tables: Sequence[CaptureTable], cfg: TrainConfig = TrainConfig(),
                   log: Any = None) -> dict[str, Any]:
    """Train the detector, its calibration and threshold, and the family model on ``tables``."""
    say = log or (lambda message: None)
    vocabulary = capture_vocabulary(tables)
    rows = draw_rows(tables, vocabulary, cfg)
    if not np.any(rows.y == 1) or not np.any(rows.y == 0):
        raise ValueError("training needs both benign and attack flows")
    # Out-of-fold scores for calibration and threshold. With three sources or more, each source is
    # held out in turn: the threshold then reflects traffic of networks the model has not seen,
    # which is what a user's network is. Otherwise folds of captures.
    sources = sorted({t.spec.source for t in tables})
    source_of = np.array([sources.index(t.spec.source) for t in tables])
    if len(sources) >= 3:
        folds = [np.flatnonzero(source_of == i) for i in range(len(sources))]
        validation = "inner leave-one-source-out over the training sources"
    else:
        # a file's rows (flow filters) are one group: its flows never validate a detector trained on it
        groups = file_groups(tables)
        has_attack = np.zeros(len(tables), dtype=bool)
        np.logical_or.at(has_attack, groups, rows.has_attack)
        used = np.unique(groups[rows.capture])
        k = max(2, min(cfg.inner_folds, int(has_attack[used].sum()), int((~has_attack[used]).sum())))
        folds = [np.flatnonzero(np.isin(groups, f))
                 for f in group_folds(groups[rows.capture], has_attack, k, cfg.seed)]
        validation = f"inner {k}-fold cross-validation grouped by capture over the training captures"
    k = len(folds)
    X_det = rows.X[:, feature_index(DETECTOR_FEATURES)]
    oof = np.zeros(len(rows.y))
    in_sample = any(len(np.unique(rows.y[~np.isin(rows.capture, held)])) < 2 for held in folds)
    if not in_sample:
        for f, held in enumerate(folds):
            test = np.isin(rows.capture, held)
            say(f"inner fold {f + 1}/{k}: {int((~test).sum()):,} training rows, {int(test.sum()):,} validation rows")
            det = fit_weighted(_detector(cfg), X_det[~test], rows.y[~test], rows.weight[~test], cfg.seed + f)
            oof[test] = det.predict_proba(X_det[test])[:, 1]
    say("fitting the detector on all training rows")
    detector = fit_weighted(_detector(cfg), X_det, rows.y, rows.weight, cfg.seed)
    if in_sample:  # too few captures to hold some out: calibrate on the training rows (said in the card)
        oof = detector.predict_proba(X_det)[:, 1]
    calibration = _calibration(oof, rows.y, rows.weight)
    calibrated = np.interp(oof, *calibration)
    threshold = choose_threshold(calibrated, rows.y, rows.capture, cfg, validation)
    if in_sample:
        threshold["rule"] += " -- here IN-SAMPLE: too few captures of each class for an inner cross-validation"
    say(f"threshold {threshold['threshold']} (validation benign FPR {threshold['validation_benign_fpr']:.4f})")
    attack = rows.y == 1
    families = [f for f in FAMILY_ORDER if np.any(rows.family[attack] == f)]
    family_model = None
    if len(families) > 1:
        from sklearn.ensemble import RandomForestClassifier

        # A forest: one ensemble for every family, cheap to apply to the flows judged attacks.
        say(f"fitting the family model ({', '.join(families)})")
        fam_y = np.array([families.index(f) for f in rows.family[attack]])
        family_model = RandomForestClassifier(n_estimators=cfg.family_trees, min_samples_leaf=2,
                                              random_state=cfg.seed, n_jobs=1)
        family_model.fit(rows.X[attack], fam_y, sample_weight=rows.weight[attack])
    benign_rows = rows.X[rows.y == 0]
    reference = np.median(benign_rows, axis=0).astype(np.float32)
    q75, q25 = np.percentile(rows.X, [75, 25], axis=0)
    scale = np.maximum(q75 - q25, 0.05 * (np.abs(rows.X).mean(axis=0) + 1e-3)).astype(np.float32)
    return {
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "meter": dict(METER_SETTINGS),
        "vocabulary": vocabulary,
        "detector": trees.from_hist_gradient_boosting(detector),  # arrays: scoring never imports scikit-learn
        "detector_features": list(DETECTOR_FEATURES),
        "calibration": calibration,
        "threshold": threshold["threshold"],
        "threshold_choice": threshold,
        "family_model": trees.compact(family_model),
        "families": families,
        "reference": reference,
        "scale": scale,
        # only the groups the detector sees: replacing the others could not change its score
        "reason_groups": [(phrase, feature_index(names)) for phrase, names in REASON_GROUPS
                          if set(names) & set(DETECTOR_FEATURES)],
        "train_config": asdict(cfg),
        "training_rows": {"rows": len(rows.y), "attack": int(attack.sum()), "benign": int((~attack).sum())},
    }


# -- the per-flow baseline: a random forest on NFStream statistics alone --------------------------

def fit_statistics_forest(tables: Sequence[CaptureTable], cfg: TrainConfig = TrainConfig()) -> dict[str, Any]:
    """What a new user would train: a random forest on per-flow NFStream statistics (no context, no
    application), classes benign + families, rows as they come (no capture weighting), threshold 0.5."""
    from sklearn.ensemble import RandomForestClassifier

    rows = draw_rows(tables, {"app": [], "category": []}, cfg)
    cols = feature_index(STATISTICS_FEATURES)
    classes = ["benign", *[f for f in FAMILY_ORDER if np.any(rows.family == f)]]
    target = np.array([classes.index(f or "benign") for f in rows.family])
    forest = RandomForestClassifier(n_estimators=100, random_state=cfg.seed, n_jobs=1)
    forest.fit(rows.X[:, cols], target)
    return {"forest": forest, "columns": cols, "classes": classes}


def forest_predict(baseline: dict[str, Any], X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probability of attack, most likely family) per row."""
    if len(X) == 0:
        return np.empty(0), np.empty(0, dtype=object)
    proba = baseline["forest"].predict_proba(X[:, baseline["columns"]])
    classes = np.asarray(baseline["classes"], dtype=object)
    score = 1.0 - proba[:, 0]
    family = classes[1:][np.argmax(proba[:, 1:], axis=1)] if proba.shape[1] > 1 else np.full(len(X), "", object)
    return score, family


def library_versions() -> dict[str, str]:
    import joblib
    import nfstream
    import sklearn

    return {"python": platform.python_version(), "scikit-learn": sklearn.__version__, "numpy": np.__version__,
            "joblib": joblib.__version__, "nfstream": getattr(nfstream, "__version__", "?")}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
