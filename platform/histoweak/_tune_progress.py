"""The console's view of a sweep: a Ray Tune callback with progress bars (imported by ``histoweak.tune`` only)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ray.tune import Callback
from tqdm import tqdm

if TYPE_CHECKING:
    from histoweak.tune import SearchSpace

__all__ = ["SweepProgress"]


class SweepProgress(Callback):
    """A Ray Tune callback: one bar for the sweep (trials done, best so far) and one per running trial (epochs).

    Runs in the driver. Picklable (Tune saves its callbacks with the sweep): the bars are made on first use.
    """

    def __init__(self, space: "SearchSpace", total: int):
        self.space, self.total = space, total
        self.best: float | None = None
        self._bar, self._trial_bars = None, {}

    def __getstate__(self):
        return {**self.__dict__, "_bar": None, "_trial_bars": {}}

    def _consider(self, value) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            if self.best is None or (value > self.best if self.space.mode == "max" else value < self.best):
                self.best = float(value)

    def _refresh(self, trials) -> None:
        if self._bar is None:
            self._bar = tqdm(total=self.total, desc=f"sweep {self.space.name}", unit="trial", dynamic_ncols=True)
        for t in trials:
            self._consider((t.last_result or {}).get(self.space.metric))
        self._bar.n = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        best = "-" if self.best is None else f"{self.best:.4g}"
        self._bar.set_postfix_str(f"best {self.space.metric} {best}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._refresh(trials)
        epochs = self.space.trial_config({k: trial.config.get(k) for k in self.space.params}).epochs
        self._trial_bars[trial.trial_id] = tqdm(total=epochs, desc=f"  {trial}", unit="epoch", leave=False,
                                                position=len(self._trial_bars) + 1, dynamic_ncols=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        bar = self._trial_bars.get(trial.trial_id)
        if bar is not None and "epoch" in result:
            bar.n = int(result["epoch"]) + 1
            value = result.get(self.space.metric)
            bar.set_postfix_str(f"{self.space.metric} {value:.4g}" if isinstance(value, float) else "")
        self._refresh(trials)

    def _end_trial(self, trials, trial) -> None:
        bar = self._trial_bars.pop(trial.trial_id, None)
        if bar is not None:
            bar.close()
        self._refresh(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end_trial(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end_trial(trials, trial)

    def on_experiment_end(self, trials, **info):
        self._refresh(trials)
        for bar in [*self._trial_bars.values(), self._bar]:
            if bar is not None:
                bar.close()
        self._bar, self._trial_bars = None, {}
