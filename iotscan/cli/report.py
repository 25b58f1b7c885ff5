"""`iotscan report`: captures, or iotscan's own NDJSON output, in; one self-contained HTML page out.

`analyze --report FILE` makes the same page beside its normal output (open_report, TeeSink).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from pathlib import Path
from typing import IO

import typer

from iotscan.cli import app
from iotscan.cli.common import (
    ACTIVE_OPTION,
    BPF_OPTION,
    IDLE_OPTION,
    MAX_FLOWS_OPTION,
    MODEL_OPTION,
    NO_DEVICES_OPTION,
    NO_SCORE_OPTION,
    QUIET_OPTION,
    THRESHOLD_OPTION,
    TRUST_MODEL_OPTION,
    OutputStream,
    StageOptions,
    main_pass_config,
    open_output,
    stdout_dash,
)
from iotscan.errors import ExitCode, InputError, ModelError
from iotscan.output.console import Reporter, error
from iotscan.output.report import InspectCommand, ReportBuilder, looks_like_records
from iotscan.pipeline import Analysis

TITLE_OPTION = typer.Option(None, "--title", help="The report's title (default: the inputs' names).")


def open_report(path: Path, inputs: Sequence[str | os.PathLike[str]], *, title: str | None, model: Path | None,
                devices: bool, score: bool, threshold: float | None, idle_timeout: int, active_timeout: int
                ) -> tuple[ReportBuilder, OutputStream]:
    """The report's builder, writing to ``path`` (never over an input); fails at once, before any work, when the
    file cannot be written or matplotlib is missing."""
    from iotscan.output.report_plots import require

    require()
    out = open_output(path, inputs)
    names = [str(p) for p in inputs]
    title = title or "iotscan report: " + ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                                                  else "")
    builder = ReportBuilder(out, title=title, cards=_cards(model if score else None, score, devices),
                            inspect=_inspect_commands(idle_timeout, active_timeout), threshold=threshold)
    return builder, out


def _cards(model: Path | None, score: bool, devices: bool) -> dict[str, dict]:
    from iotscan.detect.modelstore import bundled_model, read_card

    cards = {}
    for name, wanted, path in (("flows", score, model or bundled_model("flows")),
                               ("devices", devices, bundled_model("devices"))):
        if wanted:
            with suppress(ModelError):  # a model of the user's own without a card: the page has none to quote
                cards[name] = read_card(path)
    return cards


def _inspect_commands(idle_timeout: int, active_timeout: int) -> InspectCommand:
    """A flow's `iotscan inspect` command, for flows of a capture file that is still there to read."""
    from iotscan.inspect.selection import inspect_command

    readable: dict[str, bool] = {}

    def command(record: dict) -> str | None:
        source = str(record.get("source"))
        if source not in readable:
            if len(readable) > 4096:
                readable.clear()
            readable[source] = os.path.isfile(source)  # not stdin, a pipe or an interface
        if not readable[source]:
            return None
        try:
            return inspect_command(record, idle_timeout=idle_timeout, active_timeout=active_timeout)
        except (KeyError, TypeError, ValueError):  # a record read back without its 5-tuple
            return None

    return command


def is_records(path: Path) -> bool:
    """iotscan's NDJSON output, told by its content; on stdin, by its first byte."""
    if str(path) != "-":
        return looks_like_records(str(path))
    stdin = sys.stdin.buffer if sys.stdin is not None else None
    return stdin is not None and not stdin.isatty() and stdin.peek(1)[:1] == b"{"


def read_records(builder: ReportBuilder, path: Path, reporter: Reporter) -> ExitCode:
    """Feed one NDJSON file (or stdin) to the report; a file that holds no records is an error (exit 2)."""
    name = str(path)
    try:
        with _open_records(path) as stream:
            problems = builder.read_records(stream, name)
    except (OSError, ValueError) as exc:
        message = getattr(exc, "strerror", None) or str(exc)
        error(f"{name}: {message}")
        builder.totals.add({"errors": [{"source": name, "message": message}]})
        return ExitCode.USAGE
    for problem in problems:
        reporter.warn(f"{name}: {problem}")
        builder.totals.add({"warnings": [{"source": name, "code": "records", "message": problem}]})
    return ExitCode.OK


def _open_records(path: Path) -> AbstractContextManager[IO[bytes]]:
    # stdin as it is: its buffer holds the bytes is_records peeked at
    return nullcontext(sys.stdin.buffer) if str(path) == "-" else path.open("rb")


@app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="Capture files or directories of them (as analyze takes them), "
                                       "or files of iotscan's NDJSON output, told by their content ('-': stdin)."),
    output: Path = typer.Option(..., "--output", "-o", dir_okay=False, callback=stdout_dash,
                                help="The HTML file to write ('-': stdout)."),
    title: str | None = TITLE_OPTION,
    bpf: str | None = BPF_OPTION,
    idle_timeout: int = IDLE_OPTION,
    active_timeout: int = ACTIVE_OPTION,
    max_flows: int = MAX_FLOWS_OPTION,
    quiet: bool = QUIET_OPTION,
    no_devices: bool = NO_DEVICES_OPTION,
    threshold: float | None = THRESHOLD_OPTION,
    model: Path | None = MODEL_OPTION,
    trust_model: bool = TRUST_MODEL_OPTION,
    no_score: bool = NO_SCORE_OPTION,
) -> None:
    """One self-contained HTML page of the captures: summary, timeline, devices, who talks to whom, attack flows
    and their inspect commands, the models' figures. Options other than -o and --title apply to captures."""
    records = [p for p in paths if is_records(p)]
    captures = [p for p in paths if p not in records]
    builder, out = open_report(output, paths, title=title, model=model, devices=not no_devices, score=not no_score,
                               threshold=threshold, idle_timeout=idle_timeout, active_timeout=active_timeout)
    reporter = Reporter(quiet)
    code = ExitCode.OK
    try:
        for path in records:
            code = max(code, read_records(builder, path, reporter))
        if not captures:
            builder.close(None)
        else:
            # analyze's stages with its defaults, so that the page is the one `analyze --report` draws
            stages = StageOptions(devices=not no_devices, score=not no_score, model=model, trust_model=trust_model,
                                  threshold=threshold).build()
            config = main_pass_config("", score=not no_score, risks=True, bpf=bpf, idle_timeout=idle_timeout,
                                      active_timeout=active_timeout, max_flows=max_flows)
            analysis = Analysis(builder, stages=stages, reporter=reporter)
            try:
                analysis.run_files(captures, config)
            finally:
                analysis.finish()
            ran = analysis.exit_code()
            code = ran if ran == ExitCode.INTERRUPTED else max(code, ran)
    finally:
        out.close()
    raise typer.Exit(int(code))


def check_report_path(report_path: Path, output: Path | None) -> None:
    """`analyze --report`: a file of its own, not stdout and not the records' file."""
    if str(report_path) == "-":
        raise InputError("--report -: give the report a file name (stdout carries the records)")
    if output is not None and os.path.abspath(output) == os.path.abspath(report_path):
        raise InputError(f"{report_path}: -o and --report name the same file")
