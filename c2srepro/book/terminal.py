"""What a person running the book sees in the terminal, and where everything else goes.

1. One line per chapter as it starts (with why it runs) and as it ends (seconds, the numbers its
   JSON results hold), and one line for the chapters re-used unchanged.
2. While a chapter runs, the process's file descriptors 1 and 2 point at the chapter's log file
   (:func:`capture`), so the kernel's own output (``Kernel is running over TCP``...), papermill's
   and jupyter's logging and third-party warnings land there; the terminal is written through a
   copy of the original standard output taken before the redirection.
3. The kernel's stderr stream reaches :class:`ChapterStream` (papermill's ``stderr_file``): the
   text goes to the log, and a tqdm progress bar in it is redrawn as the terminal's one progress
   line: on a terminal only (a CI log gets the chapter lines alone). ``quarto render`` pipes its
   pre-render's output and echoes it, so where standard output is no terminal the progress line
   goes to the controlling terminal (``/dev/tty``) when there is one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import IO, Iterator

# tqdm's default bar: "desc:  49%|████▊     | 409/840 [02:24<02:15,  3.19it/s, loss=1.1]"
TQDM = re.compile(r"(?:(?P<desc>[^\r\n|]*?):\s*)?(?P<percent>\d+)%\|[^|]*\|\s*(?P<n>[\d.]+\w?)/(?P<total>[\d.]+\w?)"
                  r"\s*\[(?P<elapsed>[\d:]+)<(?P<left>[\d:?]+)")
BAR_WIDTH = 20


class Terminal:
    """Lines for the person at the terminal (``stream``: a copy of standard output, step 2)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else terminal_stream()
        self.bar = self.stream if self.stream.isatty() else _controlling_terminal()
        self._progress_shown = False

    def line(self, text: str) -> None:
        self.end_progress()
        self.stream.write(text + "\n")
        self.stream.flush()

    def progress(self, text: str) -> None:
        if self.bar is None:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.bar.write("\r\x1b[K" + text[:width])
        self.bar.flush()
        self._progress_shown = True

    def end_progress(self) -> None:
        if self._progress_shown:
            self.bar.write("\r\x1b[K")
            self.bar.flush()
            self._progress_shown = False


def _controlling_terminal() -> IO[str] | None:
    try:
        return open("/dev/tty", "w", encoding="utf-8", errors="replace")
    except OSError:  # no controlling terminal: CI, a service
        return None


def progress_line(text: str) -> str | None:
    """The terminal's progress line for the last tqdm bar state in ``text``, or None."""
    found = None
    for found in TQDM.finditer(text):
        pass
    if found is None:
        return None
    filled = int(BAR_WIDTH * min(int(found["percent"]), 100) / 100)
    desc = (found["desc"] or "").strip() or "working"
    return (f"    {desc} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {found['percent']:>3}% "
            f"{found['n']}/{found['total']}, {found['elapsed']} elapsed, {found['left']} left")


class ChapterStream:
    """papermill's ``stderr_file``: the kernel's stderr into the log, its progress bars onto the terminal."""

    def __init__(self, log: IO[str], terminal: Terminal) -> None:
        self.log, self.terminal = log, terminal

    def write(self, text: str) -> int:
        self.log.write(text)
        shown = progress_line(text)
        if shown is not None:
            self.terminal.progress(shown)
        return len(text)

    def flush(self) -> None:
        self.log.flush()


@contextlib.contextmanager
def capture(log_path: Path, terminal: Terminal) -> Iterator[IO[str]]:
    """Send file descriptors 1 and 2, Python's warnings and the root logger to ``log_path`` for the
    block (step 2); yields the open log. ``terminal`` must write to a stream made before."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as log:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        kept_handlers, kept_level = root.handlers[:], root.level
        try:
            for fd in saved:
                os.dup2(log.fileno(), fd)
            root.handlers[:] = [handler]
            root.setLevel(logging.INFO)
            logging.captureWarnings(True)
            yield log
        finally:
            logging.captureWarnings(False)
            root.handlers[:] = kept_handlers
            root.setLevel(kept_level)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
    terminal.end_progress()


def terminal_stream() -> IO[str]:
    """A copy of standard output that :func:`capture` leaves pointing at the terminal."""
    sys.stdout.flush()
    return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
