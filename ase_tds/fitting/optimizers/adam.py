"""Adam on x = Rθ (whitened: a unit step ≈ one standard deviation), the best iterate returned.

The step size starts at `Optimizer.learning_rate` (None: a quarter of the first gradient's rms, ~1/8 of the
Gauss–Newton step per coordinate). A step that raises the loss above the best so far, or makes the crystal unstable,
is undone: back to the best point, moments reset, step size × DECAY. Stops when the step size, or the largest
whitened gradient component / 2 (the distance to the minimum of the local quadratic), is below XTOL, or at
`Optimizer.max_iter`. Its whole state is checkpointed: a resumed fit continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...covariance import UnstableError
from .state import ARRAY, OptimizerState

XTOL = 1e-3  # the stop, in standard deviations
DECAY = 0.5  # the step size's factor after an undone step
BETAS = (0.9, 0.999)  # Adam's moment decay rates


@dataclass(kw_only=True)
class AdamState(OptimizerState):
    """Adam's state: `OptimizerState` (θ = the best point) plus the point x, the moments m and v (n,), the step
    count t since the last restart, the step size lr (None until the first gradient), the best loss and point,
    and whether it has converged."""

    x: np.ndarray = field(metadata=ARRAY)
    m: np.ndarray = field(metadata=ARRAY)
    v: np.ndarray = field(metadata=ARRAY)
    t: int = 0
    lr: float | None = None
    best_value: float = np.inf
    best_x: np.ndarray = field(metadata=ARRAY)
    converged: bool = False


class Adam:
    """Adam in whitened coordinates with restarts from the best point (module docstring); settings: max_iter,
    learning_rate."""

    label = "Adam"
    State = AdamState

    @staticmethod
    def start(theta, whitening, history, settings) -> AdamState:
        """A fresh state at θ (n,) with whitening R (n, n) and history [the start's loss]."""
        theta = np.asarray(theta, dtype=float)
        x = whitening @ theta
        n = len(theta)
        return AdamState(theta=theta, whitening=whitening, history=list(history), x=x, m=np.zeros(n),
                         v=np.zeros(n), lr=settings.learning_rate, best_x=x.copy())

    @staticmethod
    def run(objective, state: AdamState, settings, tick, rewhiten=None) -> dict:
        """Iterate from `state` (updated in place; θ is the best point) until converged or at settings.max_iter;
        tick(**postfix) after every iteration. Returns the status {"converged", "reason"}."""
        unwhiten = np.linalg.inv(state.whitening)
        while state.iterations < settings.max_iter and not state.converged:
            state.iterations += 1
            try:
                value, grad, _ = objective.evaluate(unwhiten @ state.x)
            except UnstableError:
                value, grad = np.inf, None
            state.history.append(value)
            if value > state.best_value:
                _restart(state)
            else:
                _step(state, value, unwhiten.T @ grad)
            state.converged = bool(state.converged or (state.lr is not None and state.lr < XTOL))
            state.theta = unwhiten @ state.best_x
            tick(loss=f"{state.best_value:.6g}", step=f"{state.lr or 0:.3g}")
        if state.converged:
            return {"converged": True, "reason": f"step or gradient below {XTOL} σ"}
        return {"converged": False, "reason": f"iteration limit ({settings.max_iter})"}


def _restart(state: AdamState) -> None:
    """Back to the best point with fresh moments and a smaller step."""
    n = len(state.x)
    lr = None if state.lr is None else state.lr * DECAY
    state.x, state.m, state.v, state.t, state.lr = state.best_x.copy(), np.zeros(n), np.zeros(n), 0, lr


def _step(state: AdamState, value: float, g: np.ndarray) -> None:
    """At a new best point (loss `value`, whitened gradient g): record it, then take Adam's step unless the
    gradient says the minimum is within XTOL."""
    if state.lr is None:
        state.lr = 0.25 * np.linalg.norm(g) / np.sqrt(len(g))
    state.best_value, state.best_x = value, state.x.copy()
    if np.abs(g).max() < 2 * XTOL:
        state.converged = True
        return
    b1, b2 = BETAS
    state.t += 1
    state.m = b1 * state.m + (1 - b1) * g
    state.v = b2 * state.v + (1 - b2) * g**2
    m_hat = state.m / (1 - b1**state.t)
    v_hat = np.sqrt(state.v / (1 - b2**state.t))
    state.x = state.x - state.lr * m_hat / (v_hat + 1e-12 * v_hat.max())
