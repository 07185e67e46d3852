"""The first fit on a subset: large data are first fitted on a random subset of their points, then on all of them
from there (`Optimizer.first_fit_points`); the long way from a poor start costs evaluations of the subset only."""

from __future__ import annotations

import warnings

import numpy as np

from ..data import TDSData
from .objective import Objective, set_theta
from .optimizers import Optimizer, minimise


def first_fit(objective: Objective, data: TDSData, exposure, optimizer: Optimizer, theta: np.ndarray,
              progress: bool) -> tuple[np.ndarray, dict | None]:
    """Fit a random subset of `optimizer.first_fit_points` of the used points (the same on every rank and run), when
    there are more than twice as many, with the loss of all the points (`objective`: its model, grid, nuisance
    terms and prior; crystals and weights chosen by the same rule at the same θ).

    Args:
        objective: the loss of all the points.
        data: the TDSData fitted (its mask: the points used).
        exposure: fit's `exposure` (one number, one per point, or None).
        optimizer: the settings, method resolved.
        theta: the start θ (n,) eV/Å².
        progress: show a progress bar.

    Returns:
        (θ (n,) the subset's minimum — or `theta` when there is no first fit —, the record {points, iterations,
        status} or None). The model is left at the returned θ.

    Raises:
        ValueError: first_fit_points not above the number of free parameters.
        UnstableError: the start is unstable (the one-phonon model meets that first here).
    """
    used = np.flatnonzero(np.asarray(data.mask, dtype=bool))
    n = optimizer.first_fit_points
    if n is None or len(used) <= 2 * n:
        return theta, None
    n_free = objective.n_theta + objective.nuisance.n_free
    if n <= n_free:
        raise ValueError(f"first_fit_points ({n}) must be more than the {n_free} free parameters; give a larger "
                         "number, or None (--first-fit-points 0) for no first fit")
    chosen = np.sort(np.random.default_rng(0).choice(used, n, replace=False))
    if exposure is not None and np.ndim(exposure):  # one per point (checked by the loss of all the points)
        exposure = np.asarray(exposure)[chosen]
    with warnings.catch_warnings():  # the loss of all the points has warned about the model's own error
        warnings.simplefilter("ignore")
        subset = Objective(objective.tds.for_points(data.q[chosen]), data.select(chosen), objective.scale_mode,
                           objective.background_mode, objective.loss, objective.compton, exposure, theta=theta,
                           prior=objective.prior, progress=progress)
    strategy = optimizer.strategy
    state = strategy.start(theta, subset.whitening(theta), [subset.evaluate(theta)[0]], optimizer)
    state, status = minimise(subset, optimizer, state, progress=progress, label=f"first fit, {n} of {len(used)} points",
                             rewhiten=subset.whitening)
    set_theta(objective.tds.force_constants, state.theta)
    return state.theta, {"points": n, "iterations": int(state.iterations), "status": status}
