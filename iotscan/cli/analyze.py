"""`iotscan analyze`: captures in, records out."""

from __future__ import annotations

from pathlib import Path

import typer

from iotscan.cli import app
from iotscan.cli.common import (
    ACTIVE_OPTION,
    ATTACKS_ONLY_OPTION,
    BASELINE_OPTION,
    BASELINE_THRESHOLD_OPTION,
    BPF_OPTION,
    FAIL_ON_OPTION,
    FORMAT_OPTION,
    IDLE_OPTION,
    MAX_FLOWS_OPTION,
    MODEL_OPTION,
    NO_DEVICES_OPTION,
    NO_HOSTS_OPTION,
    NO_SCORE_OPTION,
    OUTPUT_OPTION,
    QUIET_OPTION,
    THRESHOLD_OPTION,
    TRUST_MODEL_OPTION,
    Format,
    build_stages,
    check_attacks_only,
    flow_columns,
    main_pass_config,
    open_output,
    resolve_format,
)
from iotscan.cli.report import check_report_path, open_report
from iotscan.output.console import Reporter
from iotscan.output.records import EXPLAIN_FIELDS
from iotscan.output.report import TeeSink
from iotscan.output.sinks import make_sink
from iotscan.pipeline import Analysis

EXPLAIN_FIELD_NAMES = tuple(name for name, _ in EXPLAIN_FIELDS)


@app.command()
def analyze(
    paths: list[Path] = typer.Argument(..., help="Capture files (pcap, pcapng) or directories of them."),
    fmt: Format | None = FORMAT_OPTION,
    output: Path | None = OUTPUT_OPTION,
    bpf: str | None = BPF_OPTION,
    idle_timeout: int = IDLE_OPTION,
    active_timeout: int = ACTIVE_OPTION,
    max_flows: int = MAX_FLOWS_OPTION,
    quiet: bool = QUIET_OPTION,
    no_devices: bool = NO_DEVICES_OPTION,
    fail_on: str | None = FAIL_ON_OPTION,
    threshold: float | None = THRESHOLD_OPTION,
    model: Path | None = MODEL_OPTION,
    trust_model: bool = TRUST_MODEL_OPTION,
    no_score: bool = NO_SCORE_OPTION,
    no_hosts: bool = NO_HOSTS_OPTION,
    attacks_only: bool = ATTACKS_ONLY_OPTION,
    explain: bool = typer.Option(False, "--explain", help="Give every attack flow the ready-to-run `iotscan "
                                 "inspect` command that shows its packets (field `inspect`; listed in the table)."),
    report: Path | None = typer.Option(None, "--report", dir_okay=False,
                                       help="Also write the HTML report of the run to FILE (see `iotscan report`)."),
    baseline: list[str] | None = BASELINE_OPTION,
    baseline_threshold: float | None = BASELINE_THRESHOLD_OPTION,
) -> None:
    """Extract every flow of the captures, fingerprint devices and score flows, in one pass."""
    fmt = resolve_format(fmt, output)
    check_attacks_only(attacks_only, no_score)
    stages = build_stages(devices=not no_devices, score=not no_score, model_path=model, trust_model=trust_model,
                          threshold=threshold, hosts=not no_hosts, baseline=baseline,
                          baseline_threshold=baseline_threshold)
    if explain:
        from iotscan.inspect import InspectCommandStage

        stages.append(InspectCommandStage(idle_timeout=idle_timeout, active_timeout=active_timeout))
    config = main_pass_config("", score=not no_score, bpf=bpf, idle_timeout=idle_timeout,
                              active_timeout=active_timeout, max_flows=max_flows)
    builder, report_out = None, None
    if report is not None:  # the report's file first: it fails before any output is written
        check_report_path(report, output)
        builder, report_out = open_report(report, paths, title=None, model=model, devices=not no_devices,
                                          score=not no_score, threshold=threshold, idle_timeout=idle_timeout,
                                          active_timeout=active_timeout)
        if attacks_only:
            builder.notes.append("Made with --attacks-only: benign flows are counted in the summary but not drawn.")
    out = open_output(output, paths)
    columns = flow_columns(devices=not no_devices, score=not no_score, baseline=bool(baseline)) + \
        (EXPLAIN_FIELD_NAMES if explain else ())
    # the table's inspect command carries the time-outs flow ids depend on
    inspect_args = [*(["--idle-timeout", str(idle_timeout)] if idle_timeout != 120 else []),
                    *(["--active-timeout", str(active_timeout)] if active_timeout != 1800 else [])]
    sink = make_sink(fmt.value, out, columns=columns, inspect_args=inspect_args)
    if builder is not None:
        sink = TeeSink(sink, builder)
    analysis = Analysis(sink, stages=stages, reporter=Reporter(quiet), fail_on=fail_on, attacks_only=attacks_only)
    try:
        analysis.run_files(paths, config)
    finally:
        try:
            analysis.finish()
        finally:
            if output is not None:
                out.close()
            if report_out is not None:
                report_out.close()
    raise typer.Exit(int(analysis.exit_code()))
