"""Lean fits: the loss alone, minimised on a forward model chosen once — the evidence of the range's candidates
(`range`) and of the misfit's diagnosis (`missing`), not results: no new grid, no model error in the weights
(the data's σ alone), no first fit on a subset, no 1σ. What they compare is the loss of models on the same footing;
the chosen model's own fit (`fit`) then does all of that.
"""

from __future__ import annotations

import numpy as np

from ..data import TDSData
from ..forward import from_settings, tds_model
from .diagnosis import named_if_unstable
from .objective import Objective
from .optimizers import Optimizer, minimise

# a lean fit stops when 3 L-BFGS iterations lower its loss by less than this many χ²_red: its loss is then within
# about that of its least value, twenty times below the 2 per parameter by which the range's candidates differ
LEAN_ATOL = 0.1


def forward_settings(model, data: TDSData, options: dict) -> dict:
    """The settings (`ForwardModel.settings`) of the forward model `fit` would build for `model` on `data` at its
    current θ (the gaussian model's grid chosen there): the footing of every lean fit that follows.

    Args:
        model (ForceConstantModel): the model at its start θ.
        data: the data; its mask selects the points.
        options: `fit`'s keyword arguments (temperature, method, statistics, tds_options).

    Returns:
        The forward model's settings (method, statistics, temperature, grid, ...).

    Raises:
        UnstableError: θ is dynamically unstable (naming its most imaginary mode).
    """
    tds_options = dict(options.get("tds_options") or {})
    used = np.asarray(data.mask, dtype=bool)
    tds_options.setdefault("q_max", float(data.q_norm[used].max()))
    tds_options.setdefault("voxels", data.q[used])
    temperature = data.require_temperature(options.get("temperature"))
    with named_if_unstable(model):
        return tds_model(model, temperature, method=options.get("method", "gaussian"),
                         statistics=options.get("statistics", "quantum"), **tds_options).settings()


def objective(model, data: TDSData, settings: dict, options: dict) -> Objective:
    """The fit's loss of `model` on `data` with the forward model of `settings`, weighted by the data's σ alone.

    Args:
        model (ForceConstantModel): the model.
        data: the data; its mask selects the points.
        settings: the forward model's settings (`forward_settings`, or a fit's `FitResult.settings`).
        options: `fit`'s keyword arguments (scale, background, compton, loss, exposure; form_factors and chunk of
            tds_options).

    Returns:
        The Objective.
    """
    own = {k: v for k, v in (options.get("tds_options") or {}).items() if k in ("form_factors", "chunk")}
    return Objective(from_settings(model, settings, **own), data,
                     options.get("scale") or ("fixed" if data.absolute else "free"), options.get("background", "free"),
                     options.get("loss", "chi2"), options.get("compton", False), options.get("exposure"))


def fit_loss(model, data: TDSData, settings: dict, options: dict, max_iter: int = 200) -> tuple[float, dict]:
    """Minimise the loss of `model` on `data` (L-BFGS, at most `max_iter` iterations, stopped at `LEAN_ATOL`)
    from its θ, in place.

    Args:
        model (ForceConstantModel): the model, its θ the start (the minimum afterwards).
        data: the data; its mask selects the points.
        settings: the forward model's settings.
        options: `fit`'s keyword arguments (see `objective`).
        max_iter: the most L-BFGS iterations.

    Returns:
        (the loss at the minimum, the optimiser's status {"converged", "reason"}).

    Raises:
        UnstableError: the start θ is dynamically unstable (naming its most imaginary mode).
    """
    loss = objective(model, data, settings, options)
    optimizer = Optimizer("lbfgs", max_iter=max_iter, atol=LEAN_ATOL)
    theta = model.theta.detach().cpu().numpy().copy()
    with named_if_unstable(model):  # the optimiser refuses unstable steps: only the start can be
        state = optimizer.strategy.start(theta, loss.whitening(theta), [loss.evaluate(theta)[0]], optimizer)
    state, status = minimise(loss, optimizer, state, rewhiten=loss.whitening)
    return float(loss.evaluate(state.theta)[0]), status
