"""Progress of long loops (calibration, planning, sensitivity, evaluation, tuning) on stderr.

One helper for all of them: on a terminal a tqdm bar (rate, elapsed, time left); anywhere else
(``2>log``, a pipe, a CI log) plain lines, one every ``LOG_INTERVAL_S`` seconds and one at the
end, each a whole line with the same count, rate and time left, because tqdm's ``\\r`` redraws
turn a log file into one very long line. ``enabled=False`` (the CLI's ``--quiet``) prints nothing.

Example::

    >>> import io
    >>> log = io.StringIO()
    >>> with progress(3, desc="calibrating", unit="images", stream=log) as bar:
    ...     for _ in range(3):
    ...         bar.update(1)
    >>> log.getvalue().startswith("calibrating: 3/3 images (100%)"), log.getvalue().count("\\n")
    (True, 1)
"""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 10.0  # a line this often in a log: enough to see it move, few enough to read


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """A counter towards ``total`` drawn as a bar (terminal) or logged as lines (otherwise)."""

    def __init__(self, total: int, *, desc: str, unit: str = "it", enabled: bool = True, stream=None,
                 log_interval: float = LOG_INTERVAL_S):
        self.total, self.desc, self.unit, self.enabled = max(int(total), 0), desc, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.log_interval = log_interval
        self.n, self.postfix = 0, ""
        self.start = self.last_line = time.monotonic()
        self.logged_n = None
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=f" {unit}", file=self.stream, mininterval=0.2,
                            dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            if self.n >= self.total or now - self.last_line >= self.log_interval:
                self._line(now)

    def set_postfix(self, text: str) -> None:
        """A short status after the rate, e.g. the best time found so far."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def write(self, message: str) -> None:
        """Print a line of its own without breaking the bar."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        elif self.enabled:
            print(message, file=self.stream, flush=True)

    def wrap(self, log):
        """``log`` (a print-like function, e.g. to stdout) made to clear and redraw the bar."""
        def wrapped(*args, **kwargs):
            if self.bar is None:
                return log(*args, **kwargs)
            from tqdm import tqdm

            with tqdm.external_write_mode():
                return log(*args, **kwargs)

        return wrapped

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.logged_n != self.n:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        from tqdm import tqdm

        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else None
        left = (self.total - self.n) / rate if rate and self.total >= self.n else None
        percent = 100 * self.n / self.total if self.total else 100
        text = (f"{self.desc}: {self.n}/{self.total} {self.unit} ({percent:.0f}%) "
                f"[{tqdm.format_interval(elapsed)}<{'?' if left is None else tqdm.format_interval(left)}, "
                f"{_rate(rate)} {self.unit}/s{', ' + self.postfix if self.postfix else ''}]")
        print(text, file=self.stream, flush=True)
        self.last_line, self.logged_n = now, self.n

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rate(rate: float | None) -> str:
    if rate is None:
        return "?"
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def progress(total: int, *, desc: str, unit: str = "it", enabled: bool = True, stream=None) -> Progress:
    """A :class:`Progress` (use it as a context manager so the last line is always written)."""
    return Progress(total, desc=desc, unit=unit, enabled=enabled, stream=stream)
