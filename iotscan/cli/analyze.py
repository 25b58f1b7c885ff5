"""`iotscan analyze`: captures in, records out."""

from __future__ import annotations

import contextlib
import os
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
    FLOOD_RECORDS_OPTION,
    FORMAT_OPTION,
    IDLE_OPTION,
    MAX_FLOWS_OPTION,
    MODEL_OPTION,
    NO_DEVICES_OPTION,
    NO_HOSTS_OPTION,
    NO_RISKS_OPTION,
    NO_SCORE_OPTION,
    OUTPUT_OPTION,
    QUIET_OPTION,
    SIGNATURES_OPTION,
    THRESHOLD_OPTION,
    TRUST_MODEL_OPTION,
    FloodRecords,
    Format,
    StageOptions,
    check_attacks_only,
    check_fail_on,
    flow_columns,
    main_pass_config,
    open_output,
    resolve_format,
)
from iotscan.cli.report import check_report_path, open_report
from iotscan.errors import InputError
from iotscan.output.console import Reporter
from iotscan.output.records import EXPLAIN_FIELDS
from iotscan.output.report import TeeSink
from iotscan.output.sinks import make_sink
from iotscan.pipeline import Analysis

EXPLAIN_FIELD_NAMES = tuple(name for name, _ in EXPLAIN_FIELDS)


@app.command()
def analyze(
    paths: list[str] = typer.Argument(..., help="Capture files (pcap, pcapng) or directories of them; '-' is stdin; "
                                      "URLs (s3://, gs://, file://...) with the cluster extra."),
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
    no_risks: bool = NO_RISKS_OPTION,
    attacks_only: bool = ATTACKS_ONLY_OPTION,
    flood_records: FloodRecords = FLOOD_RECORDS_OPTION,
    signatures: list[Path] | None = SIGNATURES_OPTION,
    explain: bool = typer.Option(False, "--explain", help="Give every attack flow the ready-to-run `iotscan "
                                 "inspect` command that shows its packets (field `inspect`; listed in the table)."),
    report: Path | None = typer.Option(None, "--report", dir_okay=False,
                                       help="Also write the HTML report of the run to FILE (see `iotscan report`)."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", min=0,
                                    help="Analyse N captures at a time, in a local Dask cluster of N worker processes "
                                         "(0: one per core; 1: here, as without the option). Needs the cluster extra."),
    scheduler: str | None = typer.Option(None, "--scheduler", metavar="ADDRESS",
                                         help="Analyse the captures on the Dask cluster at ADDRESS (tcp://HOST:8786; "
                                              "default: $DASK_SCHEDULER_ADDRESS unless --jobs is given). Its workers "
                                              "read the paths as given."),
    ordered: bool = typer.Option(False, "--ordered",
                                 help="With --jobs or --scheduler: write the captures' records in input order "
                                      "(default: each capture's as soon as it is done; a capture's own records are "
                                      "always together, in order)."),
    baseline: list[str] | None = BASELINE_OPTION,
    baseline_threshold: float | None = BASELINE_THRESHOLD_OPTION,
) -> None:
    """Extract every flow of the captures, fingerprint devices and score flows, in one pass."""
    fmt = resolve_format(fmt, output)
    check_attacks_only(attacks_only, no_score)
    if jobs not in (None, 1) and scheduler:
        raise InputError("--jobs starts a local cluster and --scheduler names another: give one of them")
    scheduler = scheduler or (os.environ.get("DASK_SCHEDULER_ADDRESS") if jobs is None else None) or None
    parallel = bool(scheduler) or jobs not in (None, 1)
    if parallel:
        from iotscan.cluster.connect import require_dask

        require_dask("--scheduler" if scheduler else f"--jobs {jobs}")
        if baseline:  # its new-device alerts and profiles are the run's, not a capture's
            raise InputError("--baseline runs in one process: drop --jobs/--scheduler to use it")
    check_fail_on(fail_on, risks=not no_risks)
    options = StageOptions(devices=not no_devices, score=not no_score, model=model, trust_model=trust_model,
                           threshold=threshold, hosts=not no_hosts, flood_records=flood_records,
                           signatures=tuple(signatures or ()), risks=not no_risks, baseline=tuple(baseline or ()),
                           baseline_threshold=baseline_threshold, explain=explain,
                           idle_timeout=idle_timeout, active_timeout=active_timeout)
    stages = options.build()
    config = main_pass_config("", score=not no_score, risks=not no_risks, bpf=bpf, idle_timeout=idle_timeout,
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
    columns = flow_columns(devices=not no_devices, score=not no_score, risks=not no_risks,
                           baseline=bool(baseline)) + \
        (EXPLAIN_FIELD_NAMES if explain else ())
    # the table's inspect command carries the time-outs flow ids depend on
    inspect_args = [*(["--idle-timeout", str(idle_timeout)] if idle_timeout != 120 else []),
                    *(["--active-timeout", str(active_timeout)] if active_timeout != 1800 else [])]
    sink = make_sink(fmt.value, out, columns=columns, inspect_args=inspect_args)
    if builder is not None:
        sink = TeeSink(sink, builder)
    with contextlib.ExitStack() as cluster:
        if parallel:
            from iotscan.cluster.client import ClusterAnalysis
            from iotscan.cluster.connect import cluster_client

            client, remote = cluster.enter_context(cluster_client(jobs, scheduler))
            analysis: Analysis = ClusterAnalysis(client, sink, stages, build_stages=options.shipped().build,
                                                 reporter=Reporter(quiet), fail_on=fail_on, attacks_only=attacks_only,
                                                 ordered=ordered, remote=remote)
        else:
            analysis = Analysis(sink, stages=stages, reporter=Reporter(quiet), fail_on=fail_on,
                                attacks_only=attacks_only)
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
