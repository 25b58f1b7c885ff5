"""The bundled models' trees as numpy arrays, evaluated for a whole batch at once.

scikit-learn trains the models (iotscan/training, iotscan/training/devices.py); what they keep of them is
their trees as flat arrays, converted here, so that scoring never imports scikit-learn: its import (with
the scipy modules it pulls in) cost about 0.8 s of CPU on every run, however small the capture. The
conversion is exact: the same comparisons (``x <= threshold``; a missing value goes
the way the tree learned) and the same sums in the same order give the same numbers as scikit-learn's
``predict_proba`` (tests/test_scoring.py compares them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Trees:
    """Binary trees, all nodes in flat arrays. ``children[2 * node + go_left]`` is where a row goes next; a
    leaf is its own child, so every row may take ``depth`` steps. Trees are walked deepest first
    (``roots``): at step s only the first ``moving[s]`` are still moving; ``back`` puts them back in the
    trees' order."""

    feature: np.ndarray  # intp, per node (0 for leaves)
    threshold: np.ndarray  # float64, per node (+inf for leaves)
    missing_left: np.ndarray  # bool, per node: where a NaN goes
    children: np.ndarray  # intp, two per node: right, left
    value: np.ndarray  # float64, per node: (nodes,) or (nodes, classes)
    roots: np.ndarray  # intp, per tree, deepest tree first
    moving: tuple[int, ...]  # per step: how many trees (of roots' order) still move
    back: np.ndarray  # intp: column of each tree, in the trees' order, among roots' order

    @classmethod
    def build(cls, trees: list[dict[str, np.ndarray]]) -> Trees:
        """From per-tree arrays: feature, threshold, left, right (-1 or any value at leaves), leaf, missing_left,
        value, depth (of each node)."""
        offsets = np.cumsum([0, *(len(t["leaf"]) for t in trees)])
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("feature", "threshold", "missing", "right", "left",
                                                                "value")}
        for t, offset in zip(trees, offsets, strict=False):
            leaf = t["leaf"].astype(bool)
            own = np.arange(len(leaf)) + offset
            parts["feature"].append(np.where(leaf, 0, t["feature"]))
            parts["threshold"].append(np.where(leaf, np.inf, t["threshold"]))
            parts["missing"].append(t["missing_left"].astype(bool))
            parts["right"].append(np.where(leaf, own, t["right"] + offset))
            parts["left"].append(np.where(leaf, own, t["left"] + offset))
            parts["value"].append(t["value"])
        depths = np.array([int(t["depth"].max()) for t in trees])
        order = np.argsort(-depths, kind="stable")
        return cls(feature=np.concatenate(parts["feature"]).astype(np.intp),
                   threshold=np.concatenate(parts["threshold"]).astype(np.float64),
                   missing_left=np.concatenate(parts["missing"]),
                   children=np.stack([np.concatenate(parts["right"]), np.concatenate(parts["left"])],
                                     axis=1).ravel().astype(np.intp),
                   value=np.concatenate(parts["value"]).astype(np.float64),
                   roots=offsets[:-1][order].astype(np.intp),
                   moving=tuple(int((depths > step).sum()) for step in range(int(depths.max()))),
                   back=np.argsort(order).astype(np.intp))

    def leaves(self, X: np.ndarray) -> np.ndarray:
        """(rows, trees): the leaf each row reaches in each tree."""
        X = np.ascontiguousarray(X)
        n = len(X)
        at = np.broadcast_to(self.roots, (n, len(self.roots))).copy()
        row_start = (np.arange(n, dtype=np.intp) * X.shape[1])[:, None]
        flat = X.ravel()
        has_nan = bool(np.isnan(X).any())
        for moving in self.moving:
            nodes = at[:, :moving]
            x = flat[row_start + self.feature[nodes]]
            go_left = x <= self.threshold[nodes]  # float32 rows against float64 thresholds, as scikit-learn
            if has_nan:
                go_left |= np.isnan(x) & self.missing_left[nodes]
            at[:, :moving] = self.children[2 * nodes + go_left]
        return at[:, self.back]

    def summed(self, X: np.ndarray, start: float = 0.0) -> np.ndarray:
        """``start`` plus each tree's leaf value (a number, or one per class), added tree after tree
        (scikit-learn's order of sums)."""
        values = self.value[self.leaves(X)]
        total = values[:, 0] + start
        for t in range(1, values.shape[1]):
            total = total + values[:, t]
        return total


@dataclass(frozen=True)
class BoostedTrees:
    """A binary HistGradientBoostingClassifier: log-odds are the baseline plus the trees' values."""

    baseline: float
    trees: Trees
    n_features: int  # the columns of the rows it takes

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.trees.summed(X, start=self.baseline)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        # scipy.special.expit's arithmetic, with the C library's exp (numpy's may differ in the last bit)
        raw = self.decision_function(X)
        p = 1.0 / (1.0 + np.fromiter(map(math.exp, (-raw).tolist()), dtype=np.float64, count=len(raw)))
        return np.stack([1.0 - p, p], axis=1)


@dataclass(frozen=True)
class Forest:
    """A RandomForestClassifier: its trees' class probabilities, summed (``votes``) or averaged."""

    classes: np.ndarray
    trees: Trees
    n_features: int  # the columns of the rows it takes

    def votes(self, X: np.ndarray) -> np.ndarray:
        """(rows, classes): the trees' class probabilities summed."""
        return self.trees.summed(np.asarray(X, dtype=np.float32))  # float32 rows, as scikit-learn's trees read

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.votes(X) / self.trees.value.dtype.type(len(self.trees.roots))


def from_hist_gradient_boosting(model: Any) -> BoostedTrees:
    """The trees of a fitted binary HistGradientBoostingClassifier (numeric features only)."""
    if model.n_trees_per_iteration_ != 1:
        raise ValueError("only binary gradient boosting is supported")
    trees = []
    for (predictor,) in model._predictors:
        nodes = predictor.nodes
        if nodes["is_categorical"].any():
            raise ValueError("categorical splits are not supported")
        trees.append({"feature": nodes["feature_idx"], "threshold": nodes["num_threshold"],
                      "left": nodes["left"].astype(np.int64), "right": nodes["right"].astype(np.int64),
                      "leaf": nodes["is_leaf"], "missing_left": nodes["missing_go_to_left"], "value": nodes["value"],
                      "depth": nodes["depth"]})
    return BoostedTrees(baseline=float(np.ravel(model._baseline_prediction)[0]), trees=Trees.build(trees),
                        n_features=int(model.n_features_in_))


def from_random_forest(model: Any) -> Forest:
    """The trees of a fitted single-output RandomForestClassifier."""
    trees = []
    for estimator in model.estimators_:
        tree = estimator.tree_
        depth = np.zeros(tree.node_count, dtype=np.int64)
        for node in range(tree.node_count):  # parents come before their children
            for child in (tree.children_left[node], tree.children_right[node]):
                if child >= 0:
                    depth[child] = depth[node] + 1
        trees.append({"feature": tree.feature, "threshold": tree.threshold, "left": tree.children_left,
                      "right": tree.children_right, "leaf": tree.children_left < 0,
                      "missing_left": tree.missing_go_to_left, "value": tree.value[:, 0, :], "depth": depth})
    return Forest(classes=np.asarray(model.classes_), trees=Trees.build(trees), n_features=int(model.n_features_in_))


def compact(model: Any) -> Any:
    """A model's trees in this module's form: as they are, or converted from the scikit-learn estimator that an
    older model file holds (None stays None)."""
    if model is None or isinstance(model, BoostedTrees | Forest):
        return model
    if hasattr(model, "_predictors"):
        return from_hist_gradient_boosting(model)
    if hasattr(model, "estimators_"):
        return from_random_forest(model)
    raise ValueError(f"not a tree model: {type(model).__name__}")
