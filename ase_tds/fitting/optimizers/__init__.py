"""The optimisers of a fit: one table of named optimisers (`OPTIMIZERS`), their settings (`Optimizer`) and the one
runner (`minimise`) that drives any of them with a progress bar and a checkpoint after every iteration.

An optimiser is a class with
- `label` (its name in the progress bar) and `State`, its typed state (an `OptimizerState` subclass: also what a
  checkpoint holds, so a resumed fit continues from it);
- `start(theta, whitening, history, settings) -> State`: a fresh state at θ (n,), whitening R (n, n) (x = Rθ is
  well scaled: the Gauss–Newton matrix at the start), history [the start's loss];
- `run(objective, state, settings, tick, rewhiten=None) -> status`: iterate from `state` (updated in place; its θ
  ends at the lowest loss evaluated) until converged or at `settings.max_iter`, calling `tick(**postfix)` after
  every iteration; `objective.evaluate(θ)` gives (loss, gradient (n,), β) and raises UnstableError where the crystal
  is unstable; `rewhiten(θ)` gives R at another θ. The status is {"converged": bool, "reason": text}.

Adding an optimiser is one new file with such a class and one entry in OPTIMIZERS.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tqdm.auto import tqdm

from .adam import Adam, AdamState
from .lbfgs import LBFGS, LBFGSState
from .state import OptimizerState

OPTIMIZERS = {"lbfgs": LBFGS, "adam": Adam}


@dataclass(frozen=True)
class Optimizer:
    """How `fit` minimises the loss and when it stops; `fit(..., optimizer=Optimizer(max_iter=60))`.

    Both optimisers work in coordinates whitened by the Gauss–Newton matrix (a unit step ≈ one standard deviation).

    Args:
        method: a name of OPTIMIZERS ("lbfgs" | "adam") | None (L-BFGS; Adam for the sampling model). With a seeded
            sampler the sampling loss is a smooth deterministic function of θ, and "lbfgs" converges in far fewer
            evaluations.
        max_iter: iterations in all, those before a resumed checkpoint included (the first fit on a subset, if
            any, has as many of its own).
        rtol: L-BFGS stops when the relative change of the loss falls below it.
        gtol: L-BFGS stops when the projected (whitened) gradient falls below it.
        atol: L-BFGS stops when 3 iterations together lower the loss (a χ², or a Poisson deviance) by less than
            atol·χ²_red (the loss per point): near the minimum the loss exceeds its least value by
            χ²_red·Σ(Δθ/σ)² with σ scaled by √χ²_red, so θ is then within a few hundredths of its 1σ and further
            iterations move it by less than the fit can tell.
        learning_rate: Adam's first step in whitened units (≈ standard deviations); None = a quarter of the first
            gradient's rms. Adam stops when its step or gradient falls below 1e-3 standard deviations.
        first_fit_points: data of more than twice this many points are first fitted on a random subset of this
            many (the same subset every time; the same grid, crystals and weights as all the points), and then,
            from there, on all of them: the long way from a poor start costs evaluations of the subset, and only
            the last few iterations cost evaluations of all the points. The result is the fit of all the points
            either way. None: all the points from the start. Not for the sampling model (its points share
            sampled modes per q); not checkpointed (a resumed fit of all the points skips it; an interrupted
            first fit starts again).

    Raises:
        ValueError: an unknown method, a negative max_iter or first_fit_points not a whole number ≥ 1.
    """

    method: str | None = None
    max_iter: int = 200
    rtol: float = 1e-9
    gtol: float = 1e-6
    atol: float = 1e-3
    learning_rate: float | None = None
    first_fit_points: int | None = 100_000

    def __post_init__(self):
        if self.method is not None and self.method not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)} (or None: the model's default), got "
                             f"{self.method!r}")
        if int(self.max_iter) != self.max_iter or self.max_iter < 0:
            raise ValueError(f"max_iter must be a whole number of iterations ≥ 0, got {self.max_iter!r}")
        if self.first_fit_points is not None:
            if int(self.first_fit_points) != self.first_fit_points or self.first_fit_points < 1:
                raise ValueError(f"first_fit_points must be a whole number of points ≥ 1, or None (no first fit on "
                                 f"a subset), got {self.first_fit_points!r}")
            object.__setattr__(self, "first_fit_points", int(self.first_fit_points))  # 1e5 → 100000

    @classmethod
    def of(cls, optimizer) -> Optimizer:
        """An Optimizer from fit's `optimizer` argument: an Optimizer, a method name, or None (the defaults).

        Raises:
            TypeError: anything else.
        """
        if isinstance(optimizer, Optimizer):
            return optimizer
        if optimizer is None or isinstance(optimizer, str):
            return cls(method=optimizer)
        raise TypeError(f"optimizer must be an Optimizer, a name of {tuple(OPTIMIZERS)} or None; got "
                        f"{type(optimizer).__name__}")

    def for_method(self, method: str) -> Optimizer:
        """These settings with `method` resolved for the forward model named `method` (its `default_optimizer`:
        Adam for "sampling")."""
        from ...forward import model_class

        return dataclasses.replace(self, method=self.method or model_class(method).default_optimizer)

    @property
    def strategy(self):
        """The optimiser class of OPTIMIZERS that `method` names (resolve None with `for_method` first)."""
        return OPTIMIZERS[self.method]


def minimise(objective, settings: Optimizer, state: OptimizerState, *, saver=None, progress: bool = False,
             label: str = "fit", rewhiten=None) -> tuple[OptimizerState, dict]:
    """Run the optimiser `settings.method` from `state` (fresh, or a checkpoint's) to its stop: the one loop of a fit.

    After every iteration the progress bar moves and the checkpoint (if any) is rewritten with the state; once more
    at the end (with θ at the lowest loss evaluated).

    Args:
        objective (Objective): the loss (`evaluate(θ)`).
        settings: the Optimizer, its method resolved.
        state: the optimiser's state (its class's `State`), updated in place.
        saver (Checkpoint | None): the checkpoint file.
        progress: show a progress bar.
        label: the progress bar's name, e.g. "fit" or "first fit, 1000 of 5000 points".
        rewhiten (Callable | None): θ → the whitening R at θ, for optimisers that recompute it (L-BFGS's rounds).

    Returns:
        (state, status {"converged": bool, "reason": text}).
    """
    strategy = settings.strategy
    left = state.iterations < settings.max_iter
    with tqdm(total=settings.max_iter, initial=state.iterations, desc=f"{label} ({strategy.label})",
              disable=not (progress and left)) as bar:

        def tick(**postfix) -> None:
            bar.update(1)
            bar.set_postfix(**postfix)
            if saver is not None:
                saver.write(state)

        status = strategy.run(objective, state, settings, tick, rewhiten)
    if saver is not None and left:
        saver.write(state)
    return state, status


__all__ = ["OPTIMIZERS", "Adam", "AdamState", "LBFGS", "LBFGSState", "Optimizer", "OptimizerState", "minimise"]
