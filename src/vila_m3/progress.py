"""Progress of a long step, with the time elapsed and the time left, on a terminal and in a log.

``progress(items_or_total, description, unit)`` wraps a loop (or counts ``update()`` calls). Where it
writes depends on where the user looks:

- on a terminal (``stream``, stderr by default, is a TTY): tqdm's bar, with the step's name, the count,
  the elapsed and the remaining time (``Training the demo's VISTA3D ...: 20%|##   | 120/600 steps
  [02:10 elapsed, ~14:00 left, loss 0.3121]``);
- elsewhere (a log file, ``make run`` piped, a server's log, a status callback): plain lines, about every
  10 % of the total or every 30 s, and at the end: ``<description>: 120/600 steps, 2 min 10 s elapsed,
  ~14 min left, loss 0.3121``. They go to ``log`` when given (code that logs through a callback),
  else to the stream.

It only observes: it draws no random numbers and changes nothing about the loop it wraps.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TextIO, TypeVar

from tqdm import tqdm

__all__ = ["Progress", "duration_text", "is_terminal", "progress"]

T = TypeVar("T")

#: tqdm's bar: the step's name, the count, and the elapsed and remaining time (with a known total).
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed} elapsed, ~{remaining} left{postfix}]"
#: ... and without one.
COUNT_FORMAT = "{desc}: {n_fmt} {unit} [{elapsed} elapsed{postfix}]"


def duration_text(seconds: float) -> str:
    """A duration in words a user reads at a glance: ``45 s``, ``2 min 10 s``, ``14 min``, ``1 h 5 min``.

    Minutes alone from 10 min on, hours and minutes from 1 h on (rounded to the unit shown).
    """
    seconds = max(0.0, float(seconds))
    if seconds < 59.5:
        return f"{round(seconds)} s"
    if seconds < 599.5:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


def is_terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, captured output, None)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed stream
        return False


class Progress(Generic[T]):
    """A running step's progress (see the module docstring); make one with :func:`progress`.

    Iterate it to go through the wrapped items (each counts one ``unit`` once done), or call
    :meth:`update`; :meth:`close` (or leaving a ``with`` block) writes the final line.
    """

    def __init__(self, items: Iterable[T] | None, total: int | None, description: str, unit: str,
                 log: Callable[[str], None] | None, bar: bool | None, stream: TextIO | None,
                 clock: Callable[[], float], every_fraction: float, every_seconds: float, disable: bool) -> None:
        self.items = items
        self.total = total
        self.description = description
        self.unit = unit
        self.n = 0
        self.postfix = ""
        self._stream = stream if stream is not None else sys.stderr
        self._log = log
        self._clock = clock
        self._every_fraction = every_fraction
        self._every_seconds = every_seconds
        self._disabled = disable
        self._closed = False
        self._bar: tqdm | None = None
        self._started = clock()
        self._last_line_at = self._started
        self._last_line_n = 0
        self._next_mark = self._mark_after(0)
        use_bar = is_terminal(self._stream) if bar is None else bar
        if disable:
            return
        if use_bar:
            self._bar = tqdm(total=total, desc=description, unit=unit, file=self._stream, dynamic_ncols=True,
                             bar_format=BAR_FORMAT if total else COUNT_FORMAT)
        else:
            self._emit(f"{description}: {total} {unit} to go" if total else f"{description}: starting")

    # counting

    def __iter__(self) -> Iterator[T]:
        if self.items is None:
            raise TypeError("this progress counts update() calls; it wraps no items")
        try:
            for item in self.items:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units done; a plain line when a 10 % mark is passed or 30 s went by since the last."""
        self.n += n
        if self._disabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if (self.total and self.n >= self.total) or self.n >= self._next_mark \
                or now - self._last_line_at >= self._every_seconds:
            self._line(now)

    def set_postfix(self, text: str) -> None:
        """What follows the time in every later line or bar refresh (``loss 0.3121``); "" for nothing."""
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        """The final line (unless the last one already said it), or the bar's last refresh."""
        if self._closed:
            return
        self._closed = True
        if self._disabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif self.n != self._last_line_n:
            self._line(self._clock())

    # the plain line

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left at the mean pace so far; None without a total or before the first unit."""
        if not self.total or self.n <= 0:
            return None
        elapsed = (self._clock() if now is None else now) - self._started
        return elapsed / self.n * max(0, self.total - self.n)

    def text(self, now: float | None = None) -> str:
        """``<description>: 120/600 steps, 2 min 10 s elapsed, ~14 min left[, <postfix>]``."""
        now = self._clock() if now is None else now
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{count} {self.unit}", f"{duration_text(now - self._started)} elapsed"]
        left = self.remaining(now)
        if self.total and self.n >= self.total:
            parts.append("done")
        elif left is not None:
            parts.append(f"~{duration_text(left)} left")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.description}: {', '.join(parts)}"

    def _line(self, now: float) -> None:
        self._emit(self.text(now))
        self._last_line_at = now
        self._last_line_n = self.n
        self._next_mark = self._mark_after(self.n)

    def _mark_after(self, n: int) -> float:
        """The next count at a whole ``every_fraction`` of the total (infinite without a total)."""
        if not self.total or self._every_fraction <= 0:
            return math.inf
        step = self.total * self._every_fraction
        return max(n + 1, math.ceil((math.floor(n / step + 1e-9) + 1) * step - 1e-9))

    def _emit(self, line: str) -> None:
        if self._log is not None:
            self._log(line)
        else:
            print(line, file=self._stream, flush=True)


def progress(
    items: Iterable[T] | int | None = None,
    description: str = "Working",
    unit: str = "steps",
    *,
    total: int | None = None,
    log: Callable[[str], None] | None = None,
    bar: bool | None = None,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    every_fraction: float = 0.1,
    every_seconds: float = 30.0,
    disable: bool = False,
) -> Progress[T]:
    """Progress of a long step: a bar on a terminal, plain lines elsewhere (see the module docstring).

    Args:
        items: the items to go through, or the total number of units (for :meth:`Progress.update`).
        description: the step in words a user understands ("Training the demo's VISTA3D on synthetic
            phantom CTs").
        unit: what is counted, plural ("steps", "volumes", "records").
        total: the number of units (default: ``len(items)`` where it has one, or ``items`` when a number).
        log: where plain lines go (default: ``stream``); a bar always goes to ``stream``.
        bar: True for tqdm's bar, False for plain lines; None (default): a bar when ``stream`` is a terminal.
        stream: default ``sys.stderr``.
        clock: seconds, monotonic (tests pass a fake one; plain lines only, the bar keeps its own).
        every_fraction: a plain line each time this fraction of the total is passed (0.1: every 10 %).
        every_seconds: and at the latest this many seconds after the previous one.
        disable: no output at all (the items are still gone through).
    """
    if isinstance(items, int) and not isinstance(items, bool):
        total, items = (items if total is None else total), None
    elif total is None and items is not None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    return Progress(items, total, description, unit, log, bar, stream, clock, every_fraction, every_seconds, disable)
