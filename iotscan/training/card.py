"""The model card: what a model was trained on, how it was measured, and how well it did.

JSON for programs (``models/NAME.card.json``, which also carries the SHA-256 the loader verifies)
and Markdown for people (``models/NAME.card.md``). ``iotscan model info`` prints the latter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from iotscan.capture.source import MeterConfig
from iotscan.detect.context import KEY_TTL_S, MAX_KEYS, SET_CAP, WINDOWS_S
from iotscan.detect.features import FEATURE_NAMES, FEATURE_SCHEMA_VERSION, METER_SETTINGS
from iotscan.detect.request_findings import PAIR_AFTER_MATCH_MS, PAIR_BEFORE_MATCH_MS
from iotscan.detect.request_signatures import SIGNATURES
from iotscan.detect.scoring import ICMP_FLOOD_PACKETS, ICMP_FLOOD_RATE
from iotscan.training.dataset import CaptureTable
from iotscan.training.evaluate import MODEL_TITLES, MODELS
from iotscan.training.manifest import FAMILIES
from iotscan.training.train import library_versions, utc_now

TARGETS = {"attack_recall_per_capture": 0.95, "benign_fpr_per_flow": 0.01, "family_accuracy_per_capture": 0.80}
CONTEXT_NOTE = (
    "Context is causal: a flow's context features are computed from the flows of the same capture that "
    "expired before it (and itself); scoring is not delayed to look ahead (measured: no gain, see the notes). "
    "Windows: decayed counters with "
    f"half-lives of {', '.join(f'{w:g} s' for w in WINDOWS_S)} of capture time, per source, destination host, "
    f"service (host, port, protocol) and channel (source, service); at most {MAX_KEYS:,} keys per table, "
    f"{SET_CAP} recent peers per key, keys idle for {KEY_TTL_S:g} s dropped.")


def data_summary(tables: Sequence[CaptureTable]) -> dict[str, Any]:
    sources: dict[str, dict[str, Any]] = {}
    for t in tables:
        s = sources.setdefault(t.spec.source, {"captures": 0, "flows": 0, "benign_flows": 0, "attack_flows": 0,
                                               "unlabeled_flows": 0, "families": Counter(),
                                               "manifests": set()})
        s["captures"] += 1
        s["flows"] += len(t)
        s["benign_flows"] += int((t.y == 0).sum())
        s["attack_flows"] += int((t.y == 1).sum())
        s["unlabeled_flows"] += int((t.y < 0).sum())
        s["families"].update(f for f in t.family[t.y == 1].tolist())
        s["manifests"].add(str(t.spec.manifest))
    for s in sources.values():
        s["families"] = dict(sorted(s["families"].items()))
        s["manifests"] = sorted(s["manifests"])
    family_captures: Counter[str] = Counter()
    for t in tables:
        for f in set(t.family[t.y == 1].tolist()):
            family_captures[f] += 1
    return {"sources": sources, "attack_captures_per_family": {f: family_captures.get(f, 0) for f in FAMILIES}}


def build_card(model: dict[str, Any], tables: Sequence[CaptureTable], evaluation: dict[str, Any],
               command: str, manifests: Sequence[str]) -> dict[str, Any]:
    data = data_summary(tables)
    thin = [f for f, n in data["attack_captures_per_family"].items() if n < 3]
    return {
        "name": "iotscan flow classifier",
        "created": utc_now(),
        "command": command,
        "manifests": list(manifests),
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "features": {"count": len(FEATURE_NAMES), "names": list(FEATURE_NAMES), "meter": dict(METER_SETTINGS),
                     "detector_left_out": [n for n in FEATURE_NAMES if n not in model["detector_features"]],
                     "context": CONTEXT_NOTE, "lookahead_s": 0,
                     "vocabulary_sizes": {k: len(v) for k, v in model["vocabulary"].items()}},
        "model": {"detector": "HistGradientBoostingClassifier (attack vs benign), Platt calibration on "
                              "out-of-source scores",
                  "family_model": "RandomForestClassifier on attack flows" if model["family_model"] is not None
                  else f"single family: {model['families'][0]}",
                  "stored_as": "the fitted trees as numpy arrays (iotscan.detect.trees): scoring does not import "
                               "scikit-learn",
                  "request_signatures": [sig.name for sig in SIGNATURES],
                  "families": model["families"], "train_config": model["train_config"],
                  "training_rows": model["training_rows"]},
        "threshold": model["threshold"],
        "threshold_choice": model["threshold_choice"],
        "data": data,
        "thin_families": thin,
        "split": "by capture: every evaluation tests on captures (and in leave-one-source-out, datasets) the "
                 "model never saw; threshold and calibration come from an inner cross-validation over the "
                 "training captures of each fold",
        "evaluation": evaluation,
        "targets": TARGETS,
        "libraries": library_versions(),
    }


# -- Markdown -------------------------------------------------------------------------------------

def _f(value: Any, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if pct else f"{value:.3f}"


def _headline_table(result: dict[str, Any]) -> list[str]:
    lines = ["| model | attack recall per capture | attack recall per flow | benign FPR per flow | "
             "family accuracy per capture | family accuracy per flow | macro-F1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in MODELS:
        if m not in result:
            continue
        r = result[m]
        lines.append(f"| {MODEL_TITLES[m]} | {_f(r['attack_recall_per_capture'], True)} | "
                     f"{_f(r['attack_recall_per_flow'], True)} | {_f(r['benign_fpr_per_flow'], True)} | "
                     f"{_f(r['family_accuracy_per_capture'], True)} | {_f(r['family_accuracy_per_flow'], True)} | "
                     f"{_f(r['macro_f1'])} |")
    return lines


def _family_table(result: dict[str, Any]) -> list[str]:
    lines = ["| family | attack captures | " + " | ".join(f"{m}: recall / family acc." for m in MODELS
                                                           if m in result) + " |",
             "| --- | ---: |" + " ---: |" * sum(m in result for m in MODELS)]
    for f in FAMILIES:
        base = result["model"]["per_family"].get(f)
        if not base:
            continue
        cells = []
        for m in MODELS:
            if m not in result:
                continue
            v = result[m]["per_family"].get(f, {})
            cells.append(f"{_f(v.get('attack_recall_per_capture'), True)} / "
                         f"{_f(v.get('family_accuracy_per_capture'), True)}")
        lines.append(f"| {f} | {base['captures']} | " + " | ".join(cells) + " |")
    return lines


def _source_table(result: dict[str, Any]) -> list[str]:
    lines = ["| held-out source | captures | attack recall per capture | benign FPR per flow | "
             "family accuracy per capture |", "| --- | ---: | ---: | ---: | ---: |"]
    for src, v in result["model"]["per_source"].items():
        lines.append(f"| {src} | {v['captures']} | {_f(v['attack_recall_per_capture'], True)} | "
                     f"{_f(v['benign_fpr_per_flow'], True)} | {_f(v['family_accuracy_per_capture'], True)} |")
    return lines


def _per_class(result: dict[str, Any]) -> list[str]:
    lines = ["| class | precision | recall | F1 | flows |", "| --- | ---: | ---: | ---: | ---: |"]
    for c, v in result["per_class"].items():
        lines.append(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']:,} |")
    return lines


def _confusion(result: dict[str, Any]) -> list[str]:
    labels = result["confusion"]["labels"]
    lines = ["| true \\ predicted | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for label, row in zip(labels, result["confusion"]["matrix"], strict=True):
        lines.append(f"| {label} | " + " | ".join(f"{v:,}" for v in row) + " |")
    return lines


def _targets(result: dict[str, Any]) -> list[str]:
    r = result["model"]
    checks = [("attack recall per capture", r["attack_recall_per_capture"], ">=", 0.95),
              ("benign false-positive rate per flow", r["benign_fpr_per_flow"], "<=", 0.01),
              ("family accuracy per capture (detected attacks)", r["family_accuracy_per_capture"], ">=", 0.80)]
    out = []
    for name, value, op, target in checks:
        ok = value is not None and (value >= target if op == ">=" else value <= target)
        out.append(f"- {name}: {_f(value, True)} (target {op} {target:.0%}): **{'met' if ok else 'NOT met'}**")
    beats = []
    for base in ("forest", "rule"):
        if base not in result:
            continue
        b = result[base]
        worse = [k for k, better in (("attack_recall_per_capture", "hi"), ("benign_fpr_per_flow", "lo"),
                                     ("family_accuracy_per_capture", "hi"), ("macro_f1", "hi"))
                 if r[k] is not None and b[k] is not None and (r[k] < b[k] if better == "hi" else r[k] > b[k])]
        beats.append(f"- vs {MODEL_TITLES[base]}: " + ("better or equal on every figure" if not worse
                                                       else "worse on " + ", ".join(worse)))
    return out + beats


def card_markdown(card: dict[str, Any]) -> str:
    ev = card["evaluation"]
    lines = [f"# Model card: {card['name']}", "",
             f"Trained {card['created']} with `{card['command']}`.", "",
             "Every flow gets a verdict (`benign`/`attack`), a calibrated score (probability of attack) and, for "
             f"attacks, a family ({', '.join(card['model']['families'])} seen in training).", ""]
    lines += ["## Data", "", "| source | captures | flows | benign | attack | attack families |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for src, s in card["data"]["sources"].items():
        fams = ", ".join(f"{f} {n:,}" for f, n in s["families"].items()) or "-"
        lines.append(f"| {src} | {s['captures']} | {s['flows']:,} | {s['benign_flows']:,} | {s['attack_flows']:,} | "
                     f"{fams} |")
    per_fam = card["data"]["attack_captures_per_family"]
    lines += ["", "Attack captures per family: " + ", ".join(f"{f} {n}" for f, n in per_fam.items()) + ".",
              f"Thin families (fewer than 3 attack captures): {', '.join(card['thin_families']) or 'none'}.", "",
              f"Manifests: {', '.join(f'`{m}`' for m in card['manifests'])}."
              + (f" Left out of training and of every figure here, kept unseen: "
                 f"{', '.join(card['excluded_sources'])}." if card.get("excluded_sources") else ""), ""]
    lines += ["## Features", "",
              f"{card['features']['count']} features, schema version {card['feature_schema_version']} (checked at "
              "load). Per flow: NFStream statistics (sizes, timing, TCP flags, direction balance), the sizes and "
              "directions of the first packets, the nDPI application and category as codes of a fixed vocabulary "
              "(unknown names -> other), port classes (well-known / registered / ephemeral); no addresses, MACs, "
              "raw ports or absolute times. " + card["features"]["context"], ""]
    left_out = card["features"].get("detector_left_out")
    if left_out:
        names = ", ".join(f"`{n}`" for n in left_out)
        signatures = ", ".join(card["model"].get("request_signatures", []))
        lines[-1:-1] = ["", f"The detector leaves out {len(left_out)} of them ({names}): the application and beacon "
                        "features taught it which network a flow came from (see the notes), and the signature "
                        "features decide by themselves: a flow whose packets read by the request pass (HTTP "
                        "requests, DNS queries, scanners' probes, bots' commands, servers refusing logins, files sent "
                        f"raw, request heads held open) matched a signature ({signatures}) is an attack of the "
                        "signature's family with score 1 (`request_signature`; a signature may ask for several "
                        "matching flows between the same two hosts within minutes first), and so is every flow of the "
                        "same two hosts active "
                        f"from {PAIR_BEFORE_MATCH_MS // 1000} s before the match to {PAIR_AFTER_MATCH_MS // 1000} s "
                        "after it, unless the match was a DNS one (`pair_signature`, see the notes; a match after a "
                        "flow's end delays no scoring: on a file the request pass has read it all before the first "
                        "flow is scored, and on an interface a flow is scored at least the idle timeout "
                        f"({MeterConfig.idle_timeout} s by default) after its last packet); and so is every flow, "
                        "as long around the match, between the "
                        "host an exploit request reached and an address the request names (`named_signature`: a "
                        "log4j lookup's LDAP server, a command injection's download host). So is an ICMP flow at a "
                        "flood ping's rate "
                        f"({ICMP_FLOOD_RATE:.0f} packets a second or more, {ICMP_FLOOD_PACKETS:,} packets or more; "
                        "`iotscan.detect.scoring.icmp_flood`), and a flow sent to a local host through the MAC "
                        "another local host sends from, while the host sends from its own (`intercepted`: ARP "
                        "spoofing, see `iotscan.detect.context.LinkTracker`): spoofing. The family model uses all; "
                        "before it is asked, floods (dos, ddos) and password guessing (bruteforce) are named by rule "
                        "from the context features (`iotscan.detect.scoring.rule_families`, see the notes). A whole "
                        "exchange with a flooded host from a source that sent few of its flows is judged without the "
                        "destination's context "
                        "(`iotscan.detect.scoring.flood_bystanders`, see the notes)."]
    th = card["threshold_choice"]
    lines += ["## Threshold", "", f"Threshold **{card['threshold']}**: {th['rule']}. On those validation scores: "
              f"benign FPR {_f(th['validation_benign_fpr'], True)}, attack recall per capture "
              f"{_f(th['validation_attack_recall_per_capture'], True)}. `--threshold` overrides it.", ""]
    sections = [("leave_one_source_out", "Leave one source out (what a user on another network sees)",
                 "Train on every source but one, test on the one left out; the figures pool every held-out "
                 "capture (each scored by the model that never saw its source).")]
    for key in ev:
        if key.startswith("leave_one_source_out_without_"):
            name = ev[key].get("without") or key.removeprefix("leave_one_source_out_without_")
            sections.append((key, f"Leave one source out, without source {name}",
                             f"The same, with every capture of {name} left out of training and testing: what "
                             f"{name} adds shows in the difference."))
    sections.append(("grouped_cv", "Grouped cross-validation (captures the model never saw, sources it did)",
                     "Folds are whole captures, attack and benign captures spread over the folds."))
    for key, title, blurb in sections:
        if key not in ev:
            continue
        r = ev[key]
        lines += [f"## {title}", "", blurb, ""]
        if key.startswith("leave_one_source_out"):
            lines += ["Targets on unseen sources:", "", *_targets(r), ""]
        lines += [*_headline_table(r), "", "Per family (mean over attack captures of that family):", "",
                  *_family_table(r), ""]
        if key.startswith("leave_one_source_out"):
            lines += ["Per held-out source (flow model):", "", *_source_table(r), ""]
            lines += ["The flow model at other thresholds (`--threshold`), same held-out captures:", "",
                      "| threshold | attack recall per capture | benign FPR per flow |", "| ---: | ---: | ---: |"]
            lines += [f"| {o['threshold']} | {_f(o['attack_recall_per_capture'], True)} | "
                      f"{_f(o['benign_fpr_per_flow'], True)} |" for o in r["model"].get("operating_points", [])]
            lines += [""]
        lines += ["Per class (flow model, per flow; predicted class = family of flows judged attacks):", "",
                  *_per_class(r["model"]), "", f"Macro-F1 {_f(r['model']['macro_f1'])}.", "",
                  "Confusion matrix (flow model, flows):", "", *_confusion(r["model"]), ""]
    if "lookahead" in ev:
        lines += ["## Context look-ahead", "", ev["lookahead"], ""]
    lines += ["## Baselines", "",
              "- random forest on per-flow NFStream statistics only: 100 trees, the statistics features without "
              "context, application or early packets, classes benign + families, unweighted rows, attack when "
              "P(benign) < 0.5 (what a new user would train);",
              "- the rule \"flows of fewer than 3 packets are attacks\" (it names no family).", ""]
    if card.get("notes"):
        lines += ["## Notes", "", card["notes"].strip(), ""]
    lib = card["libraries"]
    lines += ["## Libraries", "", ", ".join(f"{k} {v}" for k, v in lib.items()) + ".", ""]
    return "\n".join(lines)


def evaluation_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The card keeps every figure but trims per-capture lists to what a reader needs."""
    out = dict(result)
    for m in MODELS:
        if m in out:
            r = dict(out[m])
            r["per_capture"] = [e for e in r["per_capture"] if "attack_recall" in e or e.get("false_positives")]
            out[m] = r
    return out


def nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj
