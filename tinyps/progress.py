"""One progress bar for a run's steps, shared by the `tinyps` command and the Python API.

A launcher reports (steps done, steps in all, the latest loss per worker, samples per
second); the bar shows them with tqdm: on standard error for the command, as a notebook
widget (or text) for the API.
"""

from __future__ import annotations

import sys

__all__ = ["StepBar"]


class StepBar:
    """A tqdm bar that a launcher drives as its `progress` callback; always close() it (or
    use it as a context manager)."""

    def __init__(self, desc: str, *, notebook: bool = False, rate: bool = True) -> None:
        if notebook:
            from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere
            self._bar = tqdm(unit="step", desc=desc)
        else:
            from tqdm import tqdm
            self._bar = tqdm(total=None, unit="step", desc=desc, file=sys.stderr,
                             dynamic_ncols=True)
        self._rate = rate
        self._file = None if notebook else sys.stderr

    def note(self, text: str) -> None:
        """A line above the bar (a fault event as it happens), the bar redrawn below it."""
        self._bar.write(text, file=self._file)

    def __call__(self, done: int, total: int, losses: dict[int, float],
                 samples_per_s: float) -> None:
        bar = self._bar
        if bar.total != total:
            bar.reset(total=total)
        loss = sum(losses.values()) / len(losses)
        text = f"loss {loss:.4f}"
        if self._rate:
            text += f", {samples_per_s:,.0f} samples/s"
        bar.set_postfix_str(text, refresh=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()  # training is over; evaluation and the report follow

    def step(self, step: int, total: int, loss: float) -> None:
        """One step of a single-process run (tinyps train)."""
        bar = self._bar
        if bar.total is None:
            bar.reset(total=total)
        bar.update(1)
        if step % 20 == 0 or step == total:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
