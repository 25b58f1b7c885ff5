"""`iotscan model`: train the flow classifier on labeled captures, show its card, check its claims."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import orjson
import typer

from iotscan.cli import app
from iotscan.errors import InputError, ModelError
from iotscan.output.console import stderr
from iotscan.training.train import TrainConfig

model_app = typer.Typer(name="model", help="Train, describe and evaluate the flow classifier.",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")

MANIFESTS_ARG = typer.Argument(..., help="Training manifests (CSV in the format of ../shared/datasets/MANIFEST.csv).")
CACHE_OPTION = typer.Option(None, "--cache-dir", file_okay=False,
                            help="Where extracted feature tables are cached (default ~/.cache/iotscan/features).")
NO_CACHE_OPTION = typer.Option(False, "--no-cache", help="Extract every capture again and cache nothing.")
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="No progress bars or messages on stderr.")


def _say(quiet: bool) -> Any:
    def say(message: str) -> None:
        if not quiet:
            stderr.print(f"[dim]{message}[/]")
    return say


def _specs(manifests: list[Path], sources: list[str] | None = None, excluded: list[str] | None = None) -> list:
    """The manifests' captures, of the datasets named (all without), but those of the datasets excluded."""
    from iotscan.training.manifest import read_manifests, select_sources

    specs = read_manifests(manifests)
    if sources:
        specs = select_sources(specs, sources)
    if excluded:
        dropped = select_sources(specs, excluded)  # an unknown name is an error, as for --source
        specs = [s for s in specs if s not in dropped]
    return specs


def _tables(manifests: list[Path], cache_dir: Path | None, no_cache: bool, quiet: bool,
            sources: list[str] | None = None, excluded: list[str] | None = None) -> list:
    from iotscan.training.dataset import default_cache_dir, load_captures

    specs = _specs(manifests, sources, excluded)  # before loading: the other datasets' captures are not metered
    tables = load_captures(specs, None if no_cache else (cache_dir or default_cache_dir()), progress=not quiet)
    if not tables:
        raise InputError("no capture of the manifests could be read")
    return tables


def _pipeline_predictions(manifests: list[Path], sources: list[str], model_path: Path | None, trust_model: bool,
                          threshold: float | None, quiet: bool) -> Any:
    from iotscan.cli.common import build_stages, main_pass_config
    from iotscan.training.pipeline_eval import evaluate_pipeline

    specs = _specs(manifests, sources)
    result = evaluate_pipeline(
        specs, lambda: build_stages(model_path=model_path, trust_model=trust_model, threshold=threshold),
        main_pass_config("", score=True), progress=_say(quiet))
    for failure in result.failed:
        _say(quiet)(f"not evaluated: {failure}")
    if not result.predictions.capture:
        raise InputError("no capture of the manifests could be analysed")
    return result.predictions


@model_app.command("train")
def train(
    manifests: list[Path] = MANIFESTS_ARG,
    output: Path = typer.Option(..., "--output", "-o", dir_okay=False, help="Model file to write (NAME.joblib); "
                                "the card goes beside it (NAME.card.json, NAME.card.md)."),
    cv_folds: int = typer.Option(5, "--cv-folds", min=0, help="Grouped cross-validation folds (0: no evaluation)."),
    loso: bool = typer.Option(True, "--loso/--no-loso", help="Leave-one-source-out evaluation."),
    without_source: list[str] = typer.Option(
        [], "--compare-without", help="Also run leave-one-source-out without this source (e.g. the attack lab), "
                                      "to show what it adds. Repeatable."),
    seed: int = typer.Option(TrainConfig.seed, "--seed", help="Random seed (sampling, folds, trees)."),
    max_iter: int = typer.Option(TrainConfig.max_iter, "--max-iter", min=1, help="Boosting iterations."),
    max_rows: int = typer.Option(TrainConfig.max_rows_per_capture, "--max-rows-per-capture", min=10,
                                 help="Rows drawn per capture at most."),
    notes: Path | None = typer.Option(None, "--notes", exists=True, dir_okay=False,
                                      help="A Markdown file added to the card (e.g. ablations measured apart)."),
    exclude_source: list[str] = typer.Option(
        [], "--exclude-source", help="Leave this dataset out of training and evaluation altogether (kept unseen, to "
                                     "measure the model on later). Repeatable."),
    cache_dir: Path | None = CACHE_OPTION,
    no_cache: bool = NO_CACHE_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Train the flow classifier on labeled captures; write the model and its card."""
    from iotscan.detect.modelstore import save_model
    from iotscan.training.card import build_card, card_markdown, evaluation_summary, nan_to_none
    from iotscan.training.evaluate import grouped_cv, leave_one_source_out
    from iotscan.training.train import fit_flow_model

    if output.suffix != ".joblib":
        raise InputError(f"{output}: the model file must end in .joblib")
    say = _say(quiet)
    cfg = TrainConfig(seed=seed, max_iter=max_iter, max_rows_per_capture=max_rows)
    tables = _tables(manifests, cache_dir, no_cache, quiet, excluded=exclude_source)
    evaluation: dict[str, Any] = {}
    try:
        if cv_folds >= 2:
            say(f"grouped cross-validation, {cv_folds} folds")
            evaluation["grouped_cv"] = evaluation_summary(grouped_cv(tables, cfg, k=cv_folds, say=say))
        sources = {t.spec.source for t in tables}
        if loso and len(sources) > 1:
            say("leave one source out")
            evaluation["leave_one_source_out"] = evaluation_summary(leave_one_source_out(tables, cfg, say=say))
            for name in without_source:
                kept = [t for t in tables if t.spec.source != name]
                if len(kept) == len(tables):
                    raise InputError(f"--compare-without {name}: no source of that name "
                                     f"(sources: {', '.join(sorted(sources))})")
                if len({t.spec.source for t in kept}) > 1:
                    say(f"leave one source out, without {name}")
                    evaluation[f"leave_one_source_out_without_{name.replace('-', '_')}"] = {
                        **evaluation_summary(leave_one_source_out(kept, cfg, say=say)), "without": name}
        say("training the final model on every capture")
        model = fit_flow_model(tables, cfg, log=say)
    except ValueError as exc:
        raise InputError(f"cannot train: {exc}") from exc
    command = "iotscan model train " + " ".join(shlex.quote(str(a)) for a in sys.argv[sys.argv.index("train") + 1:]) \
        if "train" in sys.argv else "iotscan model train"
    card = nan_to_none(build_card(model, tables, evaluation, command, [str(m) for m in manifests]))
    if exclude_source:
        card["excluded_sources"] = sorted(exclude_source)
    if notes is not None:
        card["notes"] = notes.read_text()
    digest = save_model(model, output, card, card_markdown(card))
    size = output.stat().st_size
    typer.echo(f"wrote {output} ({size / 2**20:.1f} MiB, SHA-256 {digest}) and its card")
    loso_result = evaluation.get("leave_one_source_out", {}).get("model")
    if loso_result:
        from iotscan.training.card import _f

        typer.echo(f"leave-one-source-out: attack recall per capture {_f(loso_result['attack_recall_per_capture'])}, "
                   f"benign FPR per flow {_f(loso_result['benign_fpr_per_flow'])}, family accuracy per capture "
                   f"{_f(loso_result['family_accuracy_per_capture'])}")


@model_app.command("info")
def info(
    model_path: Path | None = typer.Option(None, "--model", dir_okay=False, help="A model file (default: the "
                                           "bundled one). Only its card is read."),
    as_json: bool = typer.Option(False, "--json", help="Print the card as JSON."),
) -> None:
    """Print a model's card: data, split, metrics, threshold, libraries, SHA-256."""
    from iotscan.detect.modelstore import CARD_MD_SUFFIX, bundled_model, read_card, sha256_file

    path = model_path or bundled_model("flows")
    card = read_card(path)
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(card, option=orjson.OPT_INDENT_2) + b"\n")
        return
    md = path.with_name(path.name.removesuffix(".joblib") + CARD_MD_SUFFIX)
    try:
        text = md.read_text()
    except OSError as exc:
        raise ModelError(f"{md}: cannot read the model card: {exc.strerror or exc}") from exc
    status = "file missing"
    if path.is_file():
        status = "verified" if sha256_file(path) == card.get("sha256") else "DOES NOT MATCH the card (tampered?)"
    typer.echo(text.rstrip())
    typer.echo(f"\nModel file {path}: SHA-256 {status}.")


@model_app.command("evaluate")
def evaluate(
    manifests: list[Path] = MANIFESTS_ARG,
    model_path: Path | None = typer.Option(
        None, "--model", dir_okay=False, help="Evaluate this model instead of the bundled one (needs --trust-model)."),
    trust_model: bool = typer.Option(False, "--trust-model", help="Load --model although it cannot be verified "
                                                                   "(a model file is a pickle: it runs code)."),
    threshold: float | None = typer.Option(None, "--threshold", min=0.0, max=1.0,
                                           help="Verdict threshold (default: the model's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    source: list[str] = typer.Option(
        [], "--source", help="Only the captures of this dataset (as the manifest names it: the first directory "
                             "of its paths, or its source column). Repeatable."),
    pipeline: bool = typer.Option(
        False, "--pipeline", help="Run each capture through the whole analyze pipeline (devices, scoring, the "
                                  "host-behaviour stage) instead of scoring the flow model's feature tables."),
    cache_dir: Path | None = CACHE_OPTION,
    no_cache: bool = NO_CACHE_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Score labeled captures with a model and print the card's metrics for them."""
    from iotscan.detect.scoring import load_flow_model
    from iotscan.training.card import _confusion, _f, _per_class, nan_to_none
    from iotscan.training.evaluate import _empty, metrics, predict_all

    model, _card = load_flow_model(model_path, trust_model)
    if pipeline:
        predictions = _pipeline_predictions(manifests, source, model_path, trust_model, threshold, quiet)
    else:
        tables = _tables(manifests, cache_dir, no_cache, quiet, source)
        preds = {"model": _empty(), "rule": _empty()}
        predict_all(tables, model, None, preds, threshold)
        predictions = preds["model"]
    result = nan_to_none(metrics(predictions))
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
        return
    used = model["threshold"] if threshold is None else threshold
    lines = [f"{result['captures']} captures ({result['attack_captures']} with attacks), {result['flows']:,} labeled "
             f"flows, threshold {used}", "",
             f"attack recall per capture    {_f(result['attack_recall_per_capture'], True)}",
             f"attack recall per flow       {_f(result['attack_recall_per_flow'], True)}",
             f"benign FPR per flow          {_f(result['benign_fpr_per_flow'], True)} "
             f"({result['benign_flows']:,} benign flows)",
             f"family accuracy per capture  {_f(result['family_accuracy_per_capture'], True)}",
             f"family accuracy per flow     {_f(result['family_accuracy_per_flow'], True)}",
             f"macro-F1                     {_f(result['macro_f1'])}", "", *_per_class(result), "",
             *_confusion(result), "", "| capture | flows | attack recall | family | family acc. | false positives |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for e in result["per_capture"]:
        lines.append(f"| {e['capture']} | {e['flows']:,} | {_f(e.get('attack_recall'), True)} | "
                     f"{e.get('family') or ''} | {_f(e.get('family_accuracy'), True)} | "
                     f"{e.get('false_positives', 0):,} |")
    typer.echo("\n".join(lines))
