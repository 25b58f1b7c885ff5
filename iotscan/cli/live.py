"""`iotscan live`: watch an interface, with the same records as `analyze`, until stopped."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from iotscan.cli import app
from iotscan.cli.common import (
    ACTIVE_OPTION,
    ATTACKS_ONLY_OPTION,
    BASELINE_OPTION,
    BASELINE_THRESHOLD_OPTION,
    BPF_OPTION,
    CAPTURE_BUFFER_OPTION,
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
    QUIET_OPTION,
    SIGNATURES_OPTION,
    THRESHOLD_OPTION,
    TRUST_MODEL_OPTION,
    FloodRecords,
    Format,
    build_stages,
    check_attacks_only,
    check_fail_on,
    flow_columns,
    mac_vendor,
    main_pass_config,
    open_output,
    resolve_format,
    stdout_dash,
)
from iotscan.errors import InputError
from iotscan.live import LiveLimits, LiveRun, preflight
from iotscan.output.console import Reporter, stderr
from iotscan.output.sinks import make_sink

_HELP = (
    "Capture an interface and write each flow as it ends, with devices and verdicts, until stopped.\n\n"
    "Ctrl-C, SIGTERM, --duration and --count all stop the same way: the flows still active are flushed "
    "and scored, the summary record comes last, and the exit code is 0 (1 with --fail-on findings; 3 when "
    "capturing fails: unknown interface, no permission, interface gone). Piped, the output is NDJSON "
    "flushed per line; on a terminal, a live view runs on stderr and a table of the results is printed "
    "at the end."
)


@app.command(help=_HELP)
def live(
    interface: str = typer.Argument(..., help="Interface to capture on: eth0, wlan0, br-lan ('any': all)."),
    fmt: Format | None = FORMAT_OPTION,
    output: Path | None = typer.Option(None, "--output", "-o", dir_okay=False, callback=stdout_dash,
                                       help="Append records to FILE (created if absent) instead of stdout "
                                            "('-': stdout)."),
    bpf: str | None = BPF_OPTION,
    idle_timeout: int = IDLE_OPTION,
    active_timeout: int = ACTIVE_OPTION,
    max_flows: int = MAX_FLOWS_OPTION,
    snaplen: int = typer.Option(1536, "--snaplen", min=64, max=262144,
                                help="Bytes kept of each packet (headers and what nDPI needs to classify)."),
    capture_buffer: int = CAPTURE_BUFFER_OPTION,
    duration: float | None = typer.Option(None, "--duration", min=0.1,
                                          help="Stop after SECONDS, as cleanly as Ctrl-C."),
    count: int | None = typer.Option(None, "--count", min=1,
                                     help="Stop once FLOWS flow records are written (attack records, with "
                                          "--attacks-only); the flows still active then are flushed too, so a "
                                          "few more may follow."),
    stats_interval: float | None = typer.Option(
        None, "--stats-interval", min=1.0,
        help="Write a 'stats' record every SECONDS: packets, flows, active flows, kernel drops, rates."),
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
    baseline: list[str] | None = BASELINE_OPTION,
    baseline_threshold: float | None = BASELINE_THRESHOLD_OPTION,
    learn: float | None = typer.Option(
        None, "--learn", min=1.0,
        help="Learn each device's baseline for SECONDS first (from nothing, or on top of --baseline), then watch. "
             "While watching, the profiles keep up with the traffic that raised nothing, no faster than a cap."),
    save_baseline: Path | None = typer.Option(
        None, "--save-baseline", dir_okay=False,
        help="When the capture stops, write the baseline (as learnt, and kept current while watching) to FILE."),
) -> None:
    """Capture an interface and write each flow as it ends, with devices and verdicts, until stopped."""
    fmt = resolve_format(fmt, output)
    check_attacks_only(attacks_only, no_score)
    check_fail_on(fail_on, risks=not no_risks)
    # The view is on stderr: shown unless records are streaming onto the same terminal.
    writes_to_terminal = output is None and sys.stdout.isatty() and fmt != Format.table
    show_view = not quiet and stderr.is_terminal and not writes_to_terminal and \
        (output is not None or sys.stdout.isatty())
    config = main_pass_config(interface, score=not no_score, risks=not no_risks, live=True, bpf=bpf,
                              idle_timeout=idle_timeout, active_timeout=active_timeout, max_flows=max_flows,
                              snaplen=snaplen, buffer_mib=capture_buffer)
    limits = LiveLimits(duration_s=duration, count=count, stats_interval_s=stats_interval)
    # Everything that can fail before capturing fails before the output is touched.
    preflight(interface)
    stages = build_stages(devices=not no_devices, score=not no_score, model_path=model, trust_model=trust_model,
                          threshold=threshold, hosts=not no_hosts, flood_records=flood_records,
                          signatures=signatures, risks=not no_risks, baseline=baseline,
                          baseline_threshold=baseline_threshold, learn_s=learn, live=True)
    if save_baseline is not None and not (baseline or learn):
        raise InputError("--save-baseline saves what --learn (or --baseline) keeps: give one of them")
    out = open_output(output, append=True)
    try:
        columns = flow_columns(devices=not no_devices, score=not no_score, risks=not no_risks,
                               baseline=bool(baseline or learn))
        sink = _DevicesSeen(make_sink(fmt.value, out, columns=columns, flush_each=True))
        run = LiveRun(sink, stages, config, limits, reporter=Reporter(quiet), fail_on=fail_on,
                      view_console=stderr if show_view else None, attacks_only=attacks_only,
                      vendor=mac_vendor if show_view else None)
        code = run.run()
    finally:
        if output is not None:
            out.close()
    if save_baseline is not None:
        from iotscan.detect.baseline import BaselineStage, identity_of

        stage = next(s for s in stages if isinstance(s, BaselineStage))
        stage.save(save_baseline, {mac: identity_of(d) for mac, d in sink.devices.items()})
    raise typer.Exit(int(code))



class _DevicesSeen:
    """The sink, and the device records written to it (their identities go into a saved baseline)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.devices: dict[str, dict[str, Any]] = {}

    def write(self, record: dict[str, Any]) -> None:
        if record.get("event_type") == "device":
            self.devices[record["mac"]] = record
        self.sink.write(record)

    def close(self, summary: dict[str, Any]) -> None:
        self.sink.close(summary)
