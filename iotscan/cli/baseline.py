"""`iotscan baseline`: learn what each device normally does (learn), look at it (show), speak MUD (export-mud)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from iotscan.cli import app
from iotscan.cli.common import (
    ACTIVE_OPTION,
    BPF_OPTION,
    CAPTURE_BUFFER_MIB,
    IDLE_OPTION,
    MAX_FLOWS_OPTION,
    QUIET_OPTION,
    main_pass_config,
)
from iotscan.errors import InputError
from iotscan.output.console import Reporter, stderr

baseline_app = typer.Typer(
    name="baseline", no_args_is_help=True, rich_markup_mode="rich",
    help="Learn each device's normal behaviour, then watch for what departs from it.\n\n"
         "[bold]iotscan baseline learn CAPTURES -o site.baseline.json[/] learns a profile per local device; "
         "[bold]iotscan analyze ... --baseline site.baseline.json[/] and [bold]iotscan live IFACE --baseline ...[/] "
         "score every flow of those devices against it. See docs/baselines.md.")
app.add_typer(baseline_app, name="baseline")


class _DeviceRecords:
    """A sink that keeps only the device records (learning writes no flows)."""

    def __init__(self) -> None:
        self.devices: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {}

    def write(self, record: dict[str, Any]) -> None:
        if record.get("event_type") == "device":
            self.devices[record["mac"]] = record

    def close(self, summary: dict[str, Any]) -> None:
        self.summary = summary


@baseline_app.command("learn")
def learn(
    paths: list[Path] = typer.Argument(None, help="Capture files (pcap, pcapng) or directories of them, of a time "
                                                  "the network behaved normally."),
    output: Path = typer.Option(..., "--output", "-o", dir_okay=False,
                                help="The baseline file (JSON). When it exists, what is learnt now updates it."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over: replace an existing baseline file instead of "
                                                      "updating it."),
    from_live: str | None = typer.Option(None, "--from-live", metavar="IFACE",
                                         help="Learn from a live interface instead of captures (needs --duration)."),
    duration: float | None = typer.Option(None, "--duration", min=1.0,
                                          help="With --from-live: seconds to learn for."),
    bpf: str | None = BPF_OPTION,
    idle_timeout: int = IDLE_OPTION,
    active_timeout: int = ACTIVE_OPTION,
    max_flows: int = MAX_FLOWS_OPTION,
    model_kind: str = typer.Option("gauss", "--density-model",
                                   help="gauss or iforest (the density model of each device's minutes)."),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Learn a profile of every local device: its peers, ports, protocols, rates and hours."""
    from iotscan.detect.baseline import ProfileLearner, identity_of
    from iotscan.detect.profiles import load_baseline, save_baseline
    from iotscan.devices.stage import DeviceStage
    from iotscan.pipeline import Analysis

    if bool(paths) == bool(from_live):
        raise InputError("give capture files, or --from-live IFACE --duration SECONDS (not both)")
    if from_live and duration is None:
        raise InputError("--from-live needs --duration SECONDS: how long to learn for")
    if model_kind not in ("gauss", "iforest"):
        raise InputError(f"--density-model must be gauss or iforest, not {model_kind!r}")
    old = None
    if output.exists() and not fresh:
        old = load_baseline(output)  # a bad file stops here, before anything is captured
    elif output.parent and not output.parent.exists():
        raise InputError(f"{output}: no such directory: {output.parent}")
    for given in paths or []:
        if given.exists() and output.exists() and given.resolve() == output.resolve():
            raise InputError(f"{output}: refusing to overwrite an input capture with the baseline")
    learner = ProfileLearner()
    sink = _DeviceRecords()
    stages = [DeviceStage(), learner]
    if from_live:
        from iotscan.live import LiveLimits, LiveRun, preflight

        preflight(from_live)
        config = main_pass_config(from_live, score=False, live=True, bpf=bpf, idle_timeout=idle_timeout,
                                  active_timeout=active_timeout, max_flows=max_flows, buffer_mib=CAPTURE_BUFFER_MIB)
        run = LiveRun(sink, stages, config, LiveLimits(duration_s=duration), reporter=Reporter(quiet))
        code = run.run()
    else:
        config = main_pass_config("", score=False, bpf=bpf, idle_timeout=idle_timeout, active_timeout=active_timeout,
                                  max_flows=max_flows)
        analysis = Analysis(sink, stages=stages, reporter=Reporter(quiet), emit_flows=False)
        try:
            analysis.run_files(paths, config)
        finally:
            analysis.finish()
        code = analysis.exit_code()
    identities = {mac: identity_of(d) for mac, d in sink.devices.items()}
    if not identities and old is None:
        raise InputError("no local device in the input: nothing to learn (a device is a MAC that sends from a "
                         "private, link-local or unique-local address)")
    doc = learner.baseline(identities, old, kind=model_kind)
    save_baseline(doc, output)
    if not quiet:
        span = doc.get("span") or {}
        known = set(old["devices"]) if old else set()
        added = len(set(identities) - known)
        stderr.print(f"{'updated' if old else 'wrote'} {output}: {len(doc['devices'])} devices"
                     f"{f' ({added} new)' if old else ''}, learnt over {span.get('days', 0):.2f} days "
                     f"({span.get('first_seen', '?')} to {span.get('last_seen', '?')}), "
                     f"{output.stat().st_size / 1024:,.0f} KiB")
    raise typer.Exit(int(code))


@baseline_app.command("show")
def show(
    baseline: Path = typer.Argument(..., exists=False, dir_okay=False, help="A baseline file."),
) -> None:
    """A table of the profiles of a baseline: each device, its peers, ports and minutes."""
    from rich.table import Table

    from iotscan.detect.profiles import DeviceProfile, load_baseline

    doc = load_baseline(baseline)
    span = doc.get("span") or {}
    table = Table(title=f"{baseline}: {len(doc['devices'])} devices, {span.get('first_seen', '?')} to "
                        f"{span.get('last_seen', '?')}", title_justify="left")
    for column in ("mac", "type", "vendor", "flows", "days", "remote peers", "services out", "services in",
                   "minutes", "model"):
        table.add_column(column, overflow="fold")
    for mac, d in doc["devices"].items():
        p = DeviceProfile(mac, d)
        identity = p.identity
        top = sorted(d["remote"], key=lambda k: -sum(d["remote"][k]["out"].values()))[:3]
        table.add_row(mac, str(identity.get("device_type") or ""), str(identity.get("vendor") or ""),
                      f"{p.flows:,}", f"{p.days:.1f}",
                      f"{len(d['remote'])}: {', '.join(top)}" if top else "0",
                      ", ".join(sorted(p.services[True], key=lambda s: -p.services[True][s])[:5]),
                      ", ".join(sorted(p.services[False], key=lambda s: -p.services[False][s])[:5]),
                      f"{d['windows']['count']:,}", str((d.get("model") or {}).get("kind", "")))
    from rich.console import Console

    Console().print(table)


@baseline_app.command("export-mud")
def export_mud_files(
    baseline: Path = typer.Argument(..., dir_okay=False, help="A baseline file."),
    out_dir: Path = typer.Option(..., "--output-dir", "-o", file_okay=False,
                                 help="Directory for the MUD files: one per device, named by its MAC."),
    url_base: str = typer.Option("https://mud.example.invalid/iotscan", "--url-base",
                                 help="Where the files will be published: each file's mud-url is URL/FILE."),
    device: list[str] | None = typer.Option(None, "--device", help="Only this device (a MAC); repeat for more."),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Write one MUD file (RFC 8520) per device: ACLs that allow the peers and ports it was learnt to use."""
    import time

    import orjson

    from iotscan.detect.mud import export_mud, mud_file_name
    from iotscan.detect.profiles import load_baseline

    doc = load_baseline(baseline)
    wanted = {d.lower() for d in device or []}
    unknown = wanted - set(doc["devices"])
    if unknown:
        raise InputError(f"{baseline}: no device {sorted(unknown)[0]} in this baseline")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot create the directory: {exc.strerror or exc}") from None
    now = int(time.time() * 1000)
    written = 0
    for mac, profile in doc["devices"].items():
        if wanted and mac not in wanted:
            continue
        path = out_dir / mud_file_name(mac)
        try:
            path.write_bytes(orjson.dumps(export_mud(mac, profile, url_base, now), option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as exc:
            raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None
        written += 1
    if not quiet:
        stderr.print(f"wrote {written} MUD files to {out_dir}")
