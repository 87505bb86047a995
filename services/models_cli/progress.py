"""Upload progress on stderr: a bar on a terminal, plain lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys
from typing import TextIO

from services.models_cli.render import human_bytes
from services.registry.client import LocalFile, UploadProgress

# Plain lines: one each time a file passes another step of this share.
LINE_STEP = 0.25


def upload_progress(stream: TextIO = sys.stderr) -> UploadProgress:
    return BarProgress(stream) if stream.isatty() else LineProgress(stream)


class LineProgress:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._file: LocalFile | None = None
        self._done_bytes = 0
        self._next_report_bytes = 0

    def _say(self, line: str) -> None:
        print(line, file=self._stream, flush=True)

    def file_started(self, file: LocalFile, offset_bytes: int) -> None:
        self._file, self._done_bytes = file, offset_bytes
        self._next_report_bytes = offset_bytes + max(1, int(file.size_bytes * LINE_STEP))
        if offset_bytes:
            self._say(f"{file.path}: resuming at {offset_bytes} of {file.size_bytes} bytes")
        else:
            self._say(f"{file.path}: uploading {human_bytes(file.size_bytes)}")

    def advanced(self, num_bytes: int) -> None:
        self._done_bytes += num_bytes
        file = self._file
        if file is not None and self._next_report_bytes <= self._done_bytes < file.size_bytes:
            self._say(f"{file.path}: {self._done_bytes} of {file.size_bytes} bytes "
                      f"({100 * self._done_bytes / file.size_bytes:.0f}%)")
            self._next_report_bytes = self._done_bytes + max(1, int(file.size_bytes * LINE_STEP))

    def file_skipped(self, file: LocalFile) -> None:
        self._say(f"{file.path}: already stored, skipped")

    def file_done(self, file: LocalFile) -> None:
        self._say(f"{file.path}: uploaded")

    def close(self) -> None:
        pass


class BarProgress:
    """One rich bar per file, left on screen when done."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=Console(file=stream))
        self._task = None
        self._console = self._progress.console

    def file_started(self, file: LocalFile, offset_bytes: int) -> None:
        if self._task is None:
            self._progress.start()
        note = f" (resumed at {human_bytes(offset_bytes)})" if offset_bytes else ""
        self._task = self._progress.add_task(file.path + note, total=file.size_bytes, completed=offset_bytes)

    def advanced(self, num_bytes: int) -> None:
        self._progress.update(self._task, advance=num_bytes)

    def file_skipped(self, file: LocalFile) -> None:
        self._console.print(f"{file.path}: already stored, skipped")

    def file_done(self, file: LocalFile) -> None:
        self._progress.update(self._task, completed=file.size_bytes)

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()
