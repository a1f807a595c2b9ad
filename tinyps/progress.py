"""One progress bar for a run's steps, shared by the `tinyps` command and the Python API.

A launcher reports (steps done, steps in all, the latest loss per worker, samples per
second, the latest held-out test accuracy); the bar shows them with tqdm: on standard error
for the command, as a notebook widget (or text) for the API.
"""

from __future__ import annotations

import sys

__all__ = ["StepBar"]


class StepBar:
    """A tqdm bar that a launcher drives as its `progress` callback; always close() it (or
    use it as a context manager)."""

    def __init__(self, desc: str, *, notebook: bool = False, rate: bool = True) -> None:
        self._desc, self._notebook = desc, notebook
        self._made = None  # the tqdm bar, made at the first step: a run refused before it
        self._rate = rate  # starts leaves no empty "0step" bar behind
        self._file = None if notebook else sys.stderr

    def _bar(self, total: int):
        """The bar, made with its total at the first step (made without one, tqdm draws an
        empty "0step" bar that stays on the terminal above the real one)."""
        if self._made is None:
            if self._notebook:
                from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere
                self._made = tqdm(total=total, unit="step", desc=self._desc)
            else:
                from tqdm import tqdm
                self._made = tqdm(total=total, unit="step", desc=self._desc, file=sys.stderr,
                                  dynamic_ncols=True)
        return self._made

    def note(self, text: str) -> None:
        """A line above the bar (a fault event as it happens), the bar redrawn below it."""
        if self._made is None:  # no bar yet: a plain line
            print(text, file=self._file or sys.stdout, flush=True)
            return
        self._made.write(text, file=self._file)

    def __call__(self, done: int, total: int, losses: dict[int, float],
                 samples_per_s: float, test_accuracy: float | None = None) -> None:
        bar = self._bar(total)
        if bar.total != total:
            bar.reset(total=total)
        loss = sum(losses.values()) / len(losses)
        text = f"loss {loss:.4f}"
        if test_accuracy is not None:
            text += f", test acc {test_accuracy:.1%}"
        if self._rate:
            text += f", {samples_per_s:,.0f} samples/s"
        bar.set_postfix_str(text, refresh=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()  # training is over; evaluation and the report follow

    def step(self, step: int, total: int, loss: float) -> None:
        """One step of a single-process run (tinyps train)."""
        bar = self._bar(total)
        bar.update(1)
        if step % 20 == 0 or step == total:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self._made is not None:
            self._made.close()

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
