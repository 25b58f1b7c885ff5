"""The device model's card in Markdown (models/devices.card.md), from the card dict `iotscan devices train`
writes next to the model."""

from __future__ import annotations

from typing import Any


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
        others = ev.get("other_networks") or {}
        if others.get("units"):
            lines += ["", "### Other networks: devices of known models in captures from elsewhere", "",
                      f"Never trained on; asked of the model trained on every dataset unit ({others['units']} units): "
                      f"type accuracy {_pct(others['type_accuracy'])}, model accuracy "
                      f"{_pct(others['model_accuracy'])}.", ""]
            lines += [f"- {r['device']} ({r['model']}, {r['units']} units): type {_pct(r['type_accuracy'])}, model "
                      f"{_pct(r['model_accuracy'])}" for r in others["per_device"]]
        lines += _unseen_section(ev["leave_one_model_out"])
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card["limitations"]]
    lines += ["", "## Reproduce", "", f"    {card['training_command']}", "",
              f"Took {card.get('seconds_to_train', 0):.0f} s. Versions: "
              + ", ".join(f"{k} {v}" for k, v in card["versions"].items()) + "."]
    return "\n".join(lines)



def _unseen_section(lomo: dict[str, Any]) -> list[str]:
    targets, met = lomo["targets"], lomo["targets_met"]
    mean = lomo["per_device_mean"]

    def target(key: str, word: str) -> str:
        sign = ">=" if key == "type_right" else "<="
        return f"{word} {_pct(lomo[key])} (target {sign} {_pct(targets[key])}: {'met' if met[key] else 'not met'})"

    lines = ["", "## Devices of models it was not trained on (leave one model out)", "",
             f"Each of the {lomo['models']} device models in turn is left out of training and out of the signature "
             "data: every entry written with its captures visible, or naming it, is dropped (after which no entry "
             f"names it: checked for every model); then its {lomo['units']} captures in all (of {lomo['devices']} "
             "devices, other networks' included) are fingerprinted. What is left to type them is generic: what the "
             "maker of the MAC makes, product-kind and product-line words in the device's names and in the names "
             "it resolves, the services it offers, and behaviour (the type model).", "",
             f"Over the captures: type {target('type_right', 'right')}, {target('type_unknown', 'unknown')}, "
             f"{target('type_wrong', 'wrong')}. Averaged per device: right {_pct(mean['type_right'])}, unknown "
             f"{_pct(mean['type_unknown'])}, wrong {_pct(mean['type_wrong'])}.", "",
             f"An unknown device's type_guess is right for {_pct(lomo['guess_right_when_unknown'])} of them. The type "
             f"model alone (behaviour only, trained on the other models) names the right type for "
             f"{_pct(lomo['type_model_alone_right'])} of the captures: too few to type a device by itself, so it "
             "only adds to other evidence. A model was named for "
             f"{lomo['units'] - lomo['model_null']} captures: {lomo['model_named_right']} right and "
             f"{lomo['model_named_wrong']} wrong (a look-alike or near twin of the missing model, of the right "
             "type).", "",
             "| device | true type | units | right | unknown | wrong | guess right when unknown | type model "
             "alone | entries left out | typed by | answers |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in lomo["per_device"]:
        answers = "; ".join(f"{a} x{c}" for a, c in row["answers"].items())
        lines.append(f"| {row['device']} ({row['model']}) | {row['device_type']} | {row['units']} | "
                     f"{_pct(row['type_right'])} | {_pct(row['type_unknown'])} | {_pct(row['type_wrong'])} | "
                     f"{_pct(row['guess_right_when_unknown'])} | {_pct(row['type_model_alone_right'])} | "
                     f"{row['entries_left_out']} | {', '.join(row['typed_by'])} | {answers} |")
    return lines
