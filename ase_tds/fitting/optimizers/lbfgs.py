"""L-BFGS-B (SciPy) on x = Rθ, in rounds with the whitening R recomputed at the best point.

It runs in rounds of at most ROUND_ITERATIONS iterations; after a full round R is recomputed at the best θ
(`rewhiten(θ)`), since R from the start can be far from the curvature near the minimum (a single plane of data: a
long curved valley that L-BFGS crawled along for hundreds of iterations). A line search that stops short (e.g. at the
unstable region) also starts a new round from the best point, with a fresh memory. θ returned is the lowest loss
evaluated (never worse than the start); a step into an unstable crystal is rejected (the line search backtracks).
Its memory is not checkpointed: a resumed fit starts a fresh round from the checkpoint's θ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from ...covariance import UnstableError
from .state import OptimizerState

# L-BFGS starts a new round from the best point after a line search stops short of the minimum, or after
# ROUND_ITERATIONS iterations with the whitening recomputed there
RESTARTS = 10
ROUND_ITERATIONS = 40
STALL_ITERATIONS = 3  # iterations whose total drop of the loss is compared with Optimizer.atol·χ²_red


def stalled(losses, atol: float, n_points: int) -> bool:
    """True where the last STALL_ITERATIONS iterations of `losses` (the loss after each iteration of a run)
    together lowered it by less than atol·(loss per point, ≈ χ²_red), over `n_points` points."""
    recent = losses[-STALL_ITERATIONS - 1:]
    return len(recent) > STALL_ITERATIONS and recent[0] - recent[-1] < atol * abs(recent[-1]) / max(n_points, 1)


@dataclass(kw_only=True)
class LBFGSState(OptimizerState):
    """L-BFGS's state: θ, whitening, iterations and history (`OptimizerState`); its memory is rebuilt on resuming."""


class _Search:
    """The loss in whitened coordinates x = Rθ for SciPy, keeping the lowest loss evaluated and its gradient."""

    def __init__(self, objective, state: LBFGSState):
        self.objective, self.state = objective, state
        self.unwhiten = np.linalg.inv(state.whitening)
        self.value = state.history[-1]  # the last loss evaluated
        self.run_history = []  # the loss after each iteration of this run (state.history may hold a first fit's)
        self.best_value, self.best_theta, self.best_grad = np.inf, np.asarray(state.theta, dtype=float), None

    def loss(self, x):
        theta = self.unwhiten @ x
        try:
            value, grad, _ = self.objective.evaluate(theta)
        except UnstableError:
            # reject: a large value makes the line search backtrack toward the stable side
            return 1e6 * (abs(self.value) + 1.0), np.zeros_like(x)
        self.value = value
        grad = self.unwhiten.T @ grad
        if value < self.best_value:
            self.best_value, self.best_theta, self.best_grad = value, theta, grad
        return value, grad

    def iterated(self, x, tick, atol: float) -> None:
        state = self.state
        state.history.append(self.value)
        self.run_history.append(self.value)
        state.iterations += 1
        state.theta = self.unwhiten @ x
        tick(loss=f"{self.value:.6g}")
        if stalled(self.run_history, atol, getattr(self.objective, "n_total", 1)):
            raise StopIteration  # scipy ends the run: status 99

    def rewhiten(self, whitening: np.ndarray) -> None:
        self.state.whitening = whitening
        self.unwhiten = np.linalg.inv(whitening)
        self.best_grad = None


class LBFGS:
    """L-BFGS-B in whitened coordinates, in rounds (module docstring); settings: max_iter, rtol, gtol."""

    label = "L-BFGS"
    State = LBFGSState

    @staticmethod
    def start(theta, whitening, history, settings) -> LBFGSState:
        """A fresh state at θ (n,) with whitening R (n, n) and history [the start's loss]."""
        return LBFGSState(theta=np.asarray(theta, dtype=float), whitening=whitening, history=list(history))

    @staticmethod
    def run(objective, state: LBFGSState, settings, tick, rewhiten=None) -> dict:
        """Iterate from `state` (updated in place; θ ends at the lowest loss evaluated) until converged, stalled or
        at settings.max_iter; tick(**postfix) after every iteration. Returns the status {"converged", "reason"}."""
        max_iter = settings.max_iter
        if state.iterations >= max_iter:
            return {"converged": False, "reason": f"iteration limit ({max_iter})"}
        search = _Search(objective, state)
        for _ in range(RESTARTS + 1):
            before = search.best_value
            res = minimize(search.loss, state.whitening @ search.best_theta, jac=True, method="L-BFGS-B",
                           callback=lambda x: search.iterated(x, tick, settings.atol),
                           options=dict(maxiter=min(max_iter - state.iterations, ROUND_ITERATIONS),
                                        ftol=settings.rtol, gtol=settings.gtol, maxcor=20))
            status = lbfgs_status(res, search.best_grad, max_iter)
            if (res.status not in (1, 2) or status["converged"] or not search.best_value < before
                    or state.iterations >= max_iter):
                break
            if res.status == 1 and rewhiten is not None:  # a full round: the curvature at the best point
                search.rewhiten(rewhiten(search.best_theta))
        if state.iterations < max_iter and res.status == 1:  # a round's end, not the limit: not converged
            status = {"converged": False, "reason": f"stalled after {state.iterations} iterations"}
        state.theta = search.best_theta
        return status


def lbfgs_status(res, grad, max_iter) -> dict:
    """How L-BFGS ended. In whitened coordinates the loss is ≈ |x − x*|², so |∂loss/∂x|/2 is the distance to the
    minimum in standard deviations: below 0.01 a stop of the line search is convergence, not a stall."""
    distance = np.inf if grad is None else float(np.abs(grad).max()) / 2
    message = str(res.message)
    if res.status == 99:
        return {"converged": True, "reason": f"{STALL_ITERATIONS} iterations lowered the loss by less than "
                                             "atol times the loss per point"}
    if res.status == 0:
        which = "relative change of the loss" if "REL_REDUCTION" in message else "projected gradient"
        return {"converged": True, "reason": f"{which} below its tolerance"}
    if res.status == 1:
        return {"converged": False, "reason": f"iteration limit ({max_iter}); last step {distance:.2g} σ from the "
                                              "local minimum"}
    if distance <= 0.01:
        return {"converged": True, "reason": f"no lower loss along the search direction, {distance:.1e} σ from the "
                                             "minimum (round-off)"}
    stalled = "stalled at the start: " if res.nit == 0 else "stalled: "
    message = f" ({message.strip()})" if message.strip() else ""  # scipy's reason, where it gives one
    return {"converged": False, "reason": f"{stalled}the line search found no lower loss{message}, "
                                          f"{distance:.2g} σ from the local minimum"}
