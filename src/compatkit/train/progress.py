"""Training progress on stderr: a rich progress bar with loss, learning rate and images/s."""

from __future__ import annotations

import logging
import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger(__name__)


class ProgressReporter:
    """A context manager that shows step progress; disabled on non-main ranks."""

    def __init__(self, *, enabled: bool, total: int, done: int = 0) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None
        self._total = total
        self._done = done
        self._rate = 0.0

    def __enter__(self) -> ProgressReporter:
        if self.enabled:
            self._progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} "
                           "{task.fields[rate]:.0f} img/s"),
                TimeRemainingColumn(), console=Console(file=sys.stderr), transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self._total,
                                                 completed=self._done, epoch=0, loss=0.0,
                                                 lr=0.0, rate=0.0)
        return self

    def update(self, *, epoch: int, loss: float, parts: dict[str, float], lr: float,
               images: int, seconds: float) -> None:
        rate = images / seconds if seconds > 0 else 0.0
        self._rate = rate if self._rate == 0 else 0.9 * self._rate + 0.1 * rate
        if self._progress is not None:
            self._progress.update(self._task, advance=1, epoch=epoch, loss=loss, lr=lr,
                                  rate=self._rate)
        else:
            log.debug("epoch %d loss %.4f %s lr %.2e", epoch, loss, parts, lr)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
