"""`iotscan devices`: an inventory of the local devices in captures; `iotscan devices train`: its model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from iotscan.cli import app
from iotscan.cli.common import (
    ACTIVE_OPTION,
    BPF_OPTION,
    FORMAT_OPTION,
    IDLE_OPTION,
    MAX_FLOWS_OPTION,
    NO_RISKS_OPTION,
    OUTPUT_OPTION,
    QUIET_OPTION,
    SIGNATURES_OPTION,
    Format,
    build_stages,
    device_signatures,
    main_pass_config,
    open_output,
    resolve_format,
)
from iotscan.devices import DEVICE_FIELD_NAMES
from iotscan.output.console import Reporter
from iotscan.output.records import DEVICE_RISK_FIELD_NAMES
from iotscan.output.sinks import make_sink
from iotscan.pipeline import Analysis


class _ScanByDefault(TyperGroup):
    """`iotscan devices PATH...` means `iotscan devices scan PATH...`; `train` is the other subcommand."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["scan", *args]
        return super().parse_args(ctx, args)


devices_app = typer.Typer(
    cls=_ScanByDefault, no_args_is_help=True, rich_markup_mode="rich",
    help="Fingerprint every local device of the captures: vendor, type, model, with evidence.\n\n"
         "[bold]iotscan devices PATH...[/] prints one device record per local device (a MAC that sends "
         "traffic from a local address), then a summary. [bold]iotscan devices train[/] rebuilds the bundled "
         "device model from the labelled datasets.")
app.add_typer(devices_app, name="devices")

MODEL_OPTION = typer.Option(
    None, "--model", dir_okay=False,
    help="Device model file (default: the bundled one). Verified by the SHA-256 in its card unless --trust-model.")
TRUST_OPTION = typer.Option(
    False, "--trust-model",
    help="Load --model without checking its card's SHA-256 (a model file is code: only for files you made).")


@devices_app.command("scan")
def scan(
    paths: list[Path] = typer.Argument(..., help="Capture files (pcap, pcapng) or directories of them."),
    fmt: Format | None = FORMAT_OPTION,
    output: Path | None = OUTPUT_OPTION,
    bpf: str | None = BPF_OPTION,
    idle_timeout: int = IDLE_OPTION,
    active_timeout: int = ACTIVE_OPTION,
    max_flows: int = MAX_FLOWS_OPTION,
    quiet: bool = QUIET_OPTION,
    model: Path | None = MODEL_OPTION,
    trust_model: bool = TRUST_OPTION,
    no_identity_pass: bool = typer.Option(
        False, "--no-identity-pass",
        help="Skip the second, BPF-filtered pass over DHCP/mDNS/SSDP payloads (faster; vendor classes, mDNS "
             "and UPnP evidence are lost)."),
    signatures: list[Path] | None = SIGNATURES_OPTION,
    no_risks: bool = NO_RISKS_OPTION,
) -> None:
    """One device record per local device, then a summary (the default subcommand)."""
    from iotscan.devices.stage import DeviceStage

    fmt = resolve_format(fmt, output)
    stage = DeviceStage(model_path=model, trust_model=trust_model, identity_pass=not no_identity_pass,
                        signatures=device_signatures(signatures))
    stages = build_stages(score=False, risks=not no_risks, device_stage=stage)
    out = open_output(output, paths)
    columns = DEVICE_FIELD_NAMES + (() if no_risks else DEVICE_RISK_FIELD_NAMES)
    sink = make_sink(fmt.value, out, columns=columns, row_type="device")
    config = main_pass_config("", score=False, risks=not no_risks, bpf=bpf, idle_timeout=idle_timeout,
                              active_timeout=active_timeout, max_flows=max_flows)
    analysis = Analysis(sink, stages=stages, reporter=Reporter(quiet), emit_flows=False)
    try:
        analysis.run_files(paths, config)
    finally:
        analysis.finish()
        if output is not None:
            out.close()
    raise typer.Exit(int(analysis.exit_code()))


@devices_app.command("train")
def train(
    data: Path = typer.Option(Path("../shared/datasets"), "--data", file_okay=False,
                              help="Folder holding iot-sentinel/ and oconnor-lab/ with their devices.csv."),
    out: Path = typer.Option(
        Path("models/devices.joblib"), "--out", dir_okay=False,
        help="Where to write the model; its card goes next to it (.card.json, .card.md)."),
    window_hours: float = typer.Option(
        6.0, "--window-hours", min=0.5, help="Length of the windows the long oconnor-lab captures are cut into."),
    folds: int = typer.Option(5, "--folds", min=2, help="Cross-validation folds (grouped by capture file)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same data and seed give the same model."),
    skip_eval: bool = typer.Option(False, "--skip-eval", help="Train only; the card then has no evaluation."),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Train the device model on the labelled datasets, evaluate it by capture file, write model and card.

    Needs editcap (from tshark's package) to cut the long captures into windows. Takes a few minutes.
    """
    from iotscan.training.devices import train as run_training

    reporter = Reporter(quiet)
    card: dict[str, Any] = run_training(data, out, window_hours=window_hours, folds=folds, seed=seed,
                                        evaluate_first=not skip_eval, progress=reporter.note)
    known = (card.get("evaluation") or {}).get("known_models") or {}
    if known:
        typer.echo(f"unseen captures: type accuracy {known['type_accuracy']:.3f}, model accuracy "
                   f"{known['model_accuracy']:.3f} over {known['units']} units; card: "
                   f"{out.with_name(out.name.removesuffix('.joblib') + '.card.md')}")
    else:
        typer.echo(f"model written to {out}")
