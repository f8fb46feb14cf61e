"""Progress of long work, for the person waiting: a rich bar on a terminal, plain flushed lines anywhere else (a
log file, CI, a pipe), nothing when the caller says so. Everything goes to stderr, so stdout carries results only
(tables, `--json`). A low layer: methods, hardware, evaluation, training, experiments and the CLI all use it.

    with Progress("gptq", total=30, enabled=ctx.progress, throttled=True) as p:
        for i in range(30):
            p.status(f"layer {i + 1}/30: column sweep")   # what is being done now
            ...
            p.advance(f"layer {i + 1}/30 done")           # one unit of work finished

On a terminal the bar reads "gptq: layer 7/30: column sweep" with a count, the elapsed and the remaining time;
a bar opened while another is live (a training run inside a method step) gets a row of its own. Off a terminal
each `status` and `advance` is one line ("gptq: layer 7/30 done [7/30, 2m13s, ~7m left]"). A Progress made with
`throttled=True` (units that can come many a second: the layers of a small model, training steps) writes at most
one line per MIN_INTERVAL seconds: a line due sooner waits, and is replaced if another comes before it is written
(what was being done when the interval ends is what the log shows); the last unit's line is never held back.

Inside a process whose output another process reads (a study's cell, the evaluation's reference process),
`relay_lines` turns the lines into "progress: ..." lines on stdout (or a given stream) for the parent to relay.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from budgetlm.errors import check_interrupted

T = TypeVar("T")

MIN_INTERVAL = 1.0  # seconds between two plain lines when the later one is throttled
PROGRESS_PREFIX = "progress: "  # a child process's progress lines, for the parent that reads its output

_relay: Callable[[str], None] | None = None
_live = None  # the rich Progress every bar of this process shares while one is open
_users = 0
_lock = threading.RLock()
_last_line = float("-inf")  # when the last plain line was written
_pending: tuple[Progress, str] | None = None  # a throttled line waiting for its turn
_timer: threading.Timer | None = None


def _now() -> float:
    return time.monotonic()


@contextlib.contextmanager
def relay(callback: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, the lines of every enabled Progress go to `callback` (no bar, no stderr)."""
    global _relay
    previous, _relay = _relay, callback
    try:
        yield
    finally:
        _relay = previous


def relay_lines(stream=None) -> contextlib.AbstractContextManager:
    """relay() as "progress: ..." lines on `stream` (default stdout), for a parent process that reads them."""
    return relay(lambda text: say(text, stream))


def say(text: str, stream=None) -> None:
    """Write one "progress: ..." line (one write call, flushed: lines from a timer thread never interleave)."""
    stream = stream or sys.stdout
    stream.write(f"{PROGRESS_PREFIX}{text}\n")
    stream.flush()


def on_terminal() -> bool:
    """True when stderr is a terminal (or a notebook) that can draw a live bar."""
    from rich.console import Console

    console = Console(file=sys.stderr)
    return console.is_terminal or console.is_jupyter


def duration(seconds: float) -> str:
    """4.27 -> '4.3 s', 12.3 -> '12 s', 133 -> '2m13s', 3725 -> '1h02m'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """One long piece of work made of `total` units (None: unknown); see the module docstring. `every`: off a
    terminal, only every `every`-th unit (and the last) writes a line."""

    def __init__(
        self,
        title: str,
        total: int | None = None,
        *,
        enabled: bool = True,
        completed: int = 0,
        throttled: bool = False,
        every: int = 1,
        transient: bool = True,
    ):
        self.title, self.total, self.completed = title, total, completed
        self.throttled, self.every, self.transient = throttled, max(1, every), transient
        self.started, self._start_count = _now(), completed
        self.mode = "off" if not enabled else "relay" if _relay is not None else "bar" if on_terminal() else "lines"
        self._sink = _relay  # kept: a line the timer writes late still goes where this Progress was made to write
        self._task = None
        if self.mode == "bar":
            self._open_bar()

    def status(self, text: str, *, line: bool = True) -> None:
        """What is being done now: the bar's description, and a line off a terminal unless `line` is False."""
        if self.mode == "bar":
            _live.update(self._task, description=f"{self.title}: {text}")
        elif self.mode != "off" and line:
            self._line(f"{self.title}: {text}", self.throttled)

    def advance(self, text: str | None = None, *, log: bool = False) -> None:
        """One unit finished; `text` says which (with `log`, the text also stays above the bar on a terminal)."""
        check_interrupted()  # a SIGINT / SIGTERM whose exception was dropped where it landed: stop here
        self.completed += 1
        if self.mode == "bar":
            _live.update(self._task, advance=1, description=f"{self.title}: {text}" if text else self.title)
            if log and text:
                _live.console.print(text, highlight=False, markup=False)
        elif self.mode != "off":
            last = self.total is not None and self.completed >= self.total
            if last or self.completed % self.every == 0:
                self._line(f"{self.title}: {text or 'done'} [{self._count()}]", self.throttled and not last)

    def close(self) -> None:
        """Remove the bar (kept on screen when not transient); drop this Progress's line still waiting."""
        global _live, _users, _pending
        with _lock:
            if _pending is not None and _pending[0] is self:
                _pending = None
        if self.mode != "bar" or self._task is None:
            return
        if self.transient or _users > 1:
            _live.remove_task(self._task)
        self._task = None
        _users -= 1
        if _users == 0:
            _live.stop()
            _live = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self) -> str:
        elapsed = _now() - self.started
        if self.total is None:
            return f"{self.completed}, {duration(elapsed)}"
        text = f"{self.completed}/{self.total}, {duration(elapsed)}"
        done_here = self.completed - self._start_count
        if done_here > 0 and self.completed < self.total:
            text += f", ~{duration(elapsed / done_here * (self.total - self.completed))} left"
        return text

    def _line(self, text: str, throttled: bool) -> None:
        global _last_line, _pending
        with _lock:
            _pending = None  # a newer line replaces one still waiting
            wait = _last_line + MIN_INTERVAL - _now() if throttled else 0.0
            if wait > 0:
                _pending = (self, text)
                _schedule(wait)
                return
            _last_line = _now()
            self._write(text)

    def _write(self, text: str) -> None:
        if self.mode == "relay":
            self._sink(text)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def _open_bar(self) -> None:
        global _live, _users
        if _live is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            _live = Bar(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=self.transient,
                redirect_stdout=sys.stdout.isatty(),  # stdout that is a file or a pipe must not land on stderr
            )
            _live.start()
        _users += 1
        self._task = _live.add_task(self.title, total=self.total, completed=self.completed)


def _schedule(wait: float) -> None:
    """Write the waiting line after `wait` seconds unless a newer line replaced it (one timer at a time)."""
    global _timer
    if _timer is None or not _timer.is_alive():
        _timer = threading.Timer(wait, flush)
        _timer.daemon = True
        _timer.start()


def flush() -> None:
    """Write the line waiting for its turn, if any (the timer calls this)."""
    global _last_line, _pending
    with _lock:
        if _pending is not None:
            owner, text = _pending
            _pending = None
            _last_line = _now()
            owner._write(text)


def track(
    items: Iterable[T],
    title: str,
    *,
    label: Callable[[int, T], str] | None = None,
    total: int | None = None,
    enabled: bool = True,
    **kw,
) -> Iterator[T]:
    """Iterate `items` as the units of a Progress, each described by label(index, item) (default "3/30"). An
    item counts as done when the next one is asked for (or the end is reached); a loop left with `break` does
    not count the item it was on."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    with Progress(title, total, enabled=enabled, **kw) as p:
        for i, item in enumerate(items):
            text = label(i, item) if label else f"{i + 1}/{total}" if total is not None else str(i + 1)
            p.status(text)
            yield item
            p.advance(f"{text} done")
