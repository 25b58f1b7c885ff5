"""The command line: a thin Typer layer that wires options to the stages.

Each command lives in its own module and registers itself on ``app``; ``main`` turns every
error into one line on stderr and a documented exit code, never a traceback.
"""

from __future__ import annotations

import os
import signal
import sys

import typer

from iotscan import __version__
from iotscan.errors import ExitCode, IotscanError
from iotscan.output.console import error

app = typer.Typer(
    name="iotscan",
    help="Network-flow inspector for IoT security: flows, devices and attack verdicts from captures "
    "or live interfaces.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"iotscan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """iotscan: point it at a capture or an interface."""


# Commands register themselves on import.
from iotscan.cli import analyze as _analyze  # noqa: E402,F401
from iotscan.cli import baseline as _baseline  # noqa: E402,F401
from iotscan.cli import devices as _devices  # noqa: E402,F401
from iotscan.cli import doctor as _doctor  # noqa: E402,F401
from iotscan.cli import inspect as _inspect  # noqa: E402,F401
from iotscan.cli import lab as _lab  # noqa: E402,F401
from iotscan.cli import live as _live  # noqa: E402,F401
from iotscan.cli import model as _model  # noqa: E402,F401
from iotscan.cli import report as _report  # noqa: E402,F401


def main() -> None:
    # Like head, grep or cat: when the reader of stdout goes away (`| head`), end at once (141).
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        app(prog_name="iotscan")  # usage errors exit 2 and Ctrl-C 130 in there
    except IotscanError as exc:
        error(exc.message)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as exc:  # a bug: still one line, with a way to get the traceback
        if os.environ.get("IOTSCAN_DEBUG"):
            raise
        error(f"internal error: {type(exc).__name__}: {exc} (please report it; IOTSCAN_DEBUG=1 shows a traceback)")
        sys.exit(int(ExitCode.INTERNAL))
