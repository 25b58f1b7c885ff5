"""Errors the user can act on, and the exit codes they map to (documented in the README)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FINDINGS = 1  # findings at or above --fail-on
    USAGE = 2  # bad usage or unusable input
    CAPTURE = 3  # capture or permission error
    MODEL = 4  # model missing, tampered, untrusted or of another feature schema
    INTERNAL = 70  # a bug in iotscan (EX_SOFTWARE); the message asks for a report
    INTERRUPTED = 130  # Ctrl-C during an offline analysis (128 + SIGINT)


class IotscanError(Exception):
    """An error with a one-line message for the user and an exit code."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self)


class InputError(IotscanError):
    """A path the user gave cannot be analysed (missing, empty, not a capture...)."""

    exit_code = ExitCode.USAGE


class OutputError(IotscanError):
    """The output cannot be written: a missing directory, no permission, a full disk, a lost mount."""

    exit_code = ExitCode.USAGE


class CaptureError(IotscanError):
    """Capturing or reading packets failed (privileges, interface, dead meter)."""

    exit_code = ExitCode.CAPTURE


class ModelError(IotscanError):
    """A model cannot be used."""

    exit_code = ExitCode.MODEL
