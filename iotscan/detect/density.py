"""The density model of a device's minutes: how unusual one minute of its traffic is, as a whole.

Each device's per-minute statistics (iotscan.detect.profiles.WINDOW_FEATURES, taken as log(1 + x)) are
fitted with scikit-learn when a baseline is learnt, and kept in the baseline file as plain numbers:

* ``gauss`` (the default): a robust Gaussian, scikit-learn's MinCovDet (Rousseeuw's minimum covariance
  determinant: the minutes that do not fit the bulk do not inflate it), its location and precision
  matrix; a minute's score is its Mahalanobis distance. 9 + 81 numbers a device.
* ``iforest``: an IsolationForest, its trees kept as arrays and walked by iotscan.detect.trees (as the
  flow model's are), the score scikit-learn's ``2 ** (-mean path / c(n))``. Thousands of numbers a device.

Why the Gaussian: measured in models/baseline.card.md. Either way a score is calibrated on the device's
own minutes (their median and maximum): a minute scoring no higher than the most unusual learnt one adds
nothing; beyond it the anomaly rises with the excess, in units of the learnt spread. Each feature also
keeps its learnt 99th percentile and an envelope (1.5 x the learnt maximum, and at least a floor): scoring
looks at the model only once a minute leaves the envelope, so the per-flow cost is a few comparisons.
scikit-learn is imported only to fit, never to score.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any

import numpy as np

from iotscan.detect.profiles import FEATURE_NAMES, N_FEATURES, WINDOW_FEATURES, quantile
from iotscan.detect.trees import Trees

MIN_WINDOWS = 20  # minutes needed to fit a model; fewer: the envelope alone
ENVELOPE_FACTOR = 1.5
# below these a minute is never unusual (a device seen idle is allowed a little): flows, peers, ports,
# unanswered, hosts, packets, bytes
ENVELOPE_FLOOR = (4, 4, 3, 3, 2, 3, 40, 8_000, 8_000, )
RIDGE = 0.25  # added to the covariance's diagonal (log units): a statistic that never varied may vary a little
MAX_WEIGHT = 0.9  # the most a minute's density adds to a flow's anomaly
TAIL = 0.1  # the share of learnt minutes whose scores make the tail
MIN_SCALE = {"gauss": 0.5, "iforest": 0.01}  # of the tail, in score units: a device whose minutes are all alike
# A minute that would come once in 10**RARE_FROM learnt minutes (about a day of a device active all day) adds
# nothing; the weight grows to MAX_WEIGHT at once in 10**(RARE_FROM + RARE_SPAN) minutes.
RARE_FROM = 3.0
RARE_SPAN = 3.0
EXTRAPOLATE = 2.0  # a model of n minutes vouches for rarities down to 1 in n * 10**EXTRAPOLATE, no further
IFOREST_TREES = 25
IFOREST_SAMPLES = 64
DEFAULT_KIND = "gauss"
KINDS = ("gauss", "iforest", "envelope")


def features(rows: Any) -> np.ndarray:
    return np.log1p(np.asarray(rows, dtype=np.float64).reshape(-1, N_FEATURES))


def _round(values: Any, digits: int = 6) -> list[Any]:
    """Numbers a person can read, with the precision scoring needs."""
    out = []
    for v in np.asarray(values, dtype=np.float64).ravel().tolist():
        out.append(0.0 if v == 0 else float(f"{v:.{digits}g}"))
    return out


def fit_model(rows: list[list[int]], kind: str = DEFAULT_KIND, seed: int = 0) -> dict[str, Any]:
    """The model of one device's sampled minutes, as JSON-ready numbers (scikit-learn imported here only)."""
    X = features(rows) if rows else np.zeros((0, N_FEATURES))
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in range(N_FEATURES)]
    p99 = [quantile(list(map(float, c)), 0.99) for c in cols]
    envelope = [max(ENVELOPE_FACTOR * max(c, default=0), floor) for c, floor in zip(cols, ENVELOPE_FLOOR, strict=True)]
    model: dict[str, Any] = {"kind": "envelope", "windows": len(rows), "p99": _round(p99, 4),
                             "envelope": _round(envelope, 4)}
    if len(rows) < MIN_WINDOWS or kind == "envelope":
        return model
    if kind == "gauss":
        from sklearn.covariance import MinCovDet

        location, covariance = np.median(X, axis=0), np.cov(X, rowvar=False)
        with warnings.catch_warnings():  # "not full rank": a statistic that never varied; the ridge is for it
            warnings.simplefilter("ignore")
            try:
                mcd = MinCovDet(random_state=seed).fit(X)
                location, covariance = mcd.location_, mcd.covariance_
            except ValueError:  # most minutes alike (the support's covariance is 0): the plain one
                pass
        covariance = covariance + RIDGE * np.eye(N_FEATURES)
        model.update(kind="gauss", location=_round(location), precision=_round(np.linalg.inv(covariance)))
    elif kind == "iforest":
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(n_estimators=IFOREST_TREES, max_samples=min(IFOREST_SAMPLES, len(rows)),
                                 random_state=seed).fit(X)
        model.update(kind="iforest", samples=int(forest.max_samples_), trees=_forest_json(forest))
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    scores = np.sort(Density(model).scores(X))
    # the upper tail of the learnt minutes' scores, as an exponential beyond their 90th percentile (peaks over a
    # threshold): how rare a minute scoring s would be
    u = float(np.quantile(scores, 1.0 - TAIL))
    beta = float(np.mean(scores[scores > u] - u)) if (scores > u).any() else 0.0
    model["calibration"] = {"tail_from": _round([u])[0], "tail_scale": _round([max(beta, MIN_SCALE[kind])])[0],
                            "max": _round([scores[-1]])[0]}
    return model


def _average_path(n: np.ndarray) -> np.ndarray:
    """c(n): the average path length of an unsuccessful search in a binary search tree of n points
    (Liu, Ting and Zhou's normaliser, as scikit-learn computes it)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _forest_json(forest: Any) -> list[dict[str, list[Any]]]:
    trees = []
    for estimator, used in zip(forest.estimators_, forest.estimators_features_, strict=True):
        tree = estimator.tree_
        depth = np.zeros(tree.node_count, dtype=np.int64)
        for node in range(tree.node_count):
            for child in (tree.children_left[node], tree.children_right[node]):
                if child >= 0:
                    depth[child] = depth[node] + 1
        leaf = tree.children_left < 0
        # a leaf's value: the path to it plus c(points left in it), as scikit-learn scores
        value = np.where(leaf, depth + _average_path(tree.n_node_samples), 0.0)
        feature = np.where(leaf, 0, np.asarray(used)[np.maximum(tree.feature, 0)])
        trees.append({"feature": feature.astype(int).tolist(),
                      "threshold": _round(np.where(leaf, 0.0, tree.threshold), 9),
                      "left": np.where(leaf, -1, tree.children_left).astype(int).tolist(),
                      "right": np.where(leaf, -1, tree.children_right).astype(int).tolist(),
                      "value": _round(value, 6)})
    return trees


def check_model(model: Any) -> None:
    """Raise ValueError saying what is wrong with a model's fields."""
    if not isinstance(model, dict) or model.get("kind") not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    for name in ("p99", "envelope"):
        v = model.get(name)
        if not isinstance(v, list) or len(v) != N_FEATURES or not all(_is_number(x) and x >= 0 for x in v):
            raise ValueError(f"{name} must be {N_FEATURES} numbers >= 0 ({', '.join(FEATURE_NAMES)})")
    kind = model["kind"]
    if kind == "envelope":
        return
    cal = model.get("calibration")
    if not isinstance(cal, dict) or not all(_is_number(cal.get(k)) for k in ("tail_from", "tail_scale", "max")) \
            or cal["tail_scale"] <= 0:
        raise ValueError("calibration must be {\"tail_from\": number, \"tail_scale\": number > 0, \"max\": number}")
    if kind == "gauss":
        loc, prec = model.get("location"), model.get("precision")
        if not isinstance(loc, list) or len(loc) != N_FEATURES or not all(map(_is_number, loc)):
            raise ValueError(f"location must be {N_FEATURES} numbers")
        if not isinstance(prec, list) or len(prec) != N_FEATURES ** 2 or not all(map(_is_number, prec)):
            raise ValueError(f"precision must be {N_FEATURES ** 2} numbers (a {N_FEATURES}x{N_FEATURES} matrix, "
                             "row by row)")
        return
    trees = model.get("trees")
    if not isinstance(trees, list) or not trees or not _is_number(model.get("samples")):
        raise ValueError("trees must be a non-empty list and samples a number")
    for i, t in enumerate(trees):
        n = len(t.get("left", [])) if isinstance(t, dict) else 0
        if not n or any(not isinstance(t.get(k), list) or len(t[k]) != n
                        for k in ("feature", "threshold", "left", "right", "value")):
            raise ValueError(f"trees[{i}] must have feature, threshold, left, right and value lists of one length")
        if any(not isinstance(x, int) or not -1 <= x < n for x in t["left"] + t["right"]) \
                or any(not isinstance(x, int) or not 0 <= x < N_FEATURES for x in t["feature"]):
            raise ValueError(f"trees[{i}]: a child or feature index is out of range")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class Density:
    """Scores minutes with a model of check_model's shape."""

    def __init__(self, model: dict[str, Any]) -> None:
        self.kind = model["kind"]
        self.p99 = [float(x) for x in model["p99"]]
        self.envelope = [float(x) for x in model["envelope"]]
        cal = model.get("calibration") or {}
        self.tail_from, self.tail_scale = float(cal.get("tail_from", 0.0)), float(cal.get("tail_scale", 1.0))
        self.max_rarity = math.log10(max(int(model.get("windows", 1)), 1)) + EXTRAPOLATE
        if self.kind == "gauss":
            self.location = np.asarray(model["location"], dtype=np.float64)
            self.precision = np.asarray(model["precision"], dtype=np.float64).reshape(N_FEATURES, N_FEATURES)
        elif self.kind == "iforest":
            self.n_trees = len(model["trees"])
            self.normaliser = float(_average_path(np.array([model["samples"]]))[0])
            self.trees = Trees.build([
                {"feature": np.asarray(t["feature"]), "threshold": np.asarray(t["threshold"], dtype=np.float64),
                 "left": np.asarray(t["left"]), "right": np.asarray(t["right"]),
                 "leaf": np.asarray(t["left"]) < 0, "missing_left": np.zeros(len(t["left"]), dtype=bool),
                 "value": np.asarray(t["value"], dtype=np.float64), "depth": _depths(t["left"], t["right"])}
                for t in model["trees"]])

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Higher is more unusual: a Mahalanobis distance, or scikit-learn's IsolationForest score (positive)."""
        if self.kind == "gauss":
            d = X - self.location
            return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision, d), 0.0))
        if self.kind == "iforest":
            return 2.0 ** (-self.trees.summed(X.astype(np.float32)) / self.n_trees / self.normaliser)
        return np.zeros(len(X))

    def outside(self, counts: list[int]) -> bool:
        """Whether a minute left the envelope (cheap: per flow, so compared in C)."""
        return any(map(operator.gt, counts, self.envelope))

    def weight(self, counts: list[int]) -> float:
        """What a minute adds to the anomaly of its flows, 0..MAX_WEIGHT."""
        if not self.outside(counts):
            return 0.0
        if self.kind == "envelope":
            excess = max(math.log1p(c) - math.log1p(e) for c, e in zip(counts, self.envelope, strict=True))
            return MAX_WEIGHT * (1.0 - math.exp(-2.0 * excess))
        score = float(self.scores(features([counts]))[0])
        if score <= self.tail_from:
            return 0.0
        rarity = -math.log10(TAIL) + (score - self.tail_from) / self.tail_scale / math.log(10)  # -log10 P(S > s)
        rarity = min(rarity, self.max_rarity)
        return MAX_WEIGHT * min(1.0, max(0.0, (rarity - RARE_FROM) / RARE_SPAN))

    def reason(self, counts: list[int]) -> tuple[str, str]:
        """The statistic furthest beyond its learnt 99th percentile, in words, and its name."""
        _, j = max((math.log1p(c) - math.log1p(p), j) for j, (c, p) in enumerate(zip(counts, self.p99, strict=True)))
        name, _, phrase = WINDOW_FEATURES[j]
        return f"{phrase.format(f'{counts[j]:,}')} in one minute; baseline p99 is {self.p99[j]:,.0f}", name


def _depths(left: list[int], right: list[int]) -> np.ndarray:
    depth = np.zeros(len(left), dtype=np.int64)
    for node in range(len(left)):
        for child in (left[node], right[node]):
            if child >= 0:
                depth[child] = depth[node] + 1
    return depth
