"""Everything iotscan tells a person on stderr: errors always, progress and warnings on a terminal."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One line, always, whatever the terminal: scripts grep for it."""
    print(f"iotscan: error: {message}", file=sys.stderr, flush=True)


class Reporter:
    """Progress bars and warnings for a person at a terminal; silent when stderr is not one."""

    def __init__(self, quiet: bool = False) -> None:
        self.interactive = stderr.is_terminal and not quiet

    def warn(self, message: str) -> None:
        if self.interactive:
            stderr.print(f"[yellow]warning:[/] {escape(message)}")

    def note(self, message: str) -> None:
        if self.interactive:
            stderr.print(escape(message))

    def progress(self) -> ProgressView:
        return ProgressView(self.interactive)


class ProgressView:
    """A Rich progress bar fed by a poller thread, so the per-flow path never touches it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressView:
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[rates]}"),
                TimeElapsedColumn(),
                console=stderr,
                transient=True,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.track(None)
        if self._progress is not None:
            self._progress.stop()

    def track(self, poll: Callable[[], tuple[str, int | None, int, str]] | None) -> None:
        """Follow one source: poll() returns (description, total bytes or None, bytes done, rates text)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._progress is None or poll is None:
            return
        for task in list(self._progress.task_ids):
            self._progress.remove_task(task)
        description, total, done, rates = poll()
        task = self._progress.add_task(description, total=total, completed=done, rates=rates)
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(0.2):
                try:
                    description, total, done, rates = poll()
                except Exception:  # a vanished /proc entry must not break the run
                    continue
                self._progress.update(task, description=description, total=total, completed=done, rates=rates)

        self._thread = threading.Thread(target=loop, name="iotscan-progress", daemon=True)
        self._thread.start()


def bytes_read_by(pid: int | None, path: str) -> int | None:
    """How far process pid has read into path, from /proc (Linux); None when unknown."""
    if pid is None:
        return None
    target = os.path.realpath(path)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.path.realpath(f"/proc/{pid}/fd/{fd}") == target:
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    for line in info:
                        if line.startswith("pos:"):
                            return int(line.split()[1])
    except OSError:
        return None
    return None
