"""The forward model's own error in a fit: the gaussian model's discretisation error, kept below a fifth of σ.

At the θ a fit starts from, `choose_crystals` estimates the gaussian model's error δ = |I(grid) − I(1.5 × grid)|
(`ForwardModel.discretisation_error`) at every point, moves a point whose δ exceeds MODEL_ERROR_FRACTION of its σ to the
next larger crystal (twice at most), and returns what remains, which the objective adds to every point's variance.
`record` summarises an estimate for `FitResult.model_error`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .. import distributed
from ..forward.gaussian import GRID_FACTORS

# the forward model's own error is kept below this fraction of the data's σ
MODEL_ERROR_FRACTION = 0.2
# the true discretisation error is within this many times the estimate |I(grid) − I(1.5 × grid)|
# (benchmarks/convergence.py: on every point checked, four crystals against 32³ references)
MODEL_ERROR_COVERAGE = 2.0


def without_grid(method: str) -> dict:
    """The record of a forward model that has no grid error to estimate (one-phonon, sampling)."""
    return {"estimate": "none", "reason": f"the {method} model has no grid (its Debye–Waller mesh is "
                                          "extrapolated; sampling carries its Monte-Carlo error)"}


def choose_crystals(tds, q, sigma, scale: float, intensity, n_total: int):
    """The crystal of each point and the error that remains there, for the gaussian model at its current θ.

    A point whose error exceeds MODEL_ERROR_FRACTION of σ moves to the next larger crystal (`GaussianModel.forward`'s
    levels; twice at most; never with refine=False, which asks for one periodic crystal); what remains is
    returned, and a warning says on how many points it still exceeds σ/5.

    Args:
        tds (GaussianModel): the gaussian model, at the θ the error is estimated at.
        q (torch.Tensor): this rank's points, Cartesian (N, 3) Å⁻¹.
        sigma (torch.Tensor): the data's σ (N,), data units.
        scale: |s|, the profiled scale at that θ (data units per e.u./atom).
        intensity (torch.Tensor): I (N,) e.u./atom at that θ.
        n_total: the points of all ranks (for the warning).

    Returns:
        (levels (N,) int tensor, δ (N,) in data units, the record kept in FitResult.model_error).
    """
    levels = tds.levels(q)
    delta = scale * tds.discretisation_error(q, levels)  # in data units
    promoted = torch.zeros_like(levels, dtype=torch.bool)
    for _ in range(2 if tds.refine else 0):  # refine=False: one periodic crystal, as asked; δ goes to the variance
        move = (delta > MODEL_ERROR_FRACTION * sigma) & (levels < len(GRID_FACTORS) - 1)
        if not move.any():
            break
        levels = levels + move
        promoted |= move
        pick = torch.nonzero(move)[:, 0]
        delta[pick] = scale * tds.discretisation_error(q[pick], levels[pick])
    above = int(distributed.total(float((delta > MODEL_ERROR_FRACTION * sigma).sum())))
    summary = record(delta / scale, intensity, sigma / scale)
    summary["points_on_larger_crystals"] = int(distributed.total(float(promoted.sum())))
    if above:
        warnings.warn(f"the forward model's own error exceeds a fifth of σ on {above} of {n_total} points "
                      f"(largest {summary['max_over_sigma']:.2g} σ) after moving them to larger crystals (twice at "
                      "most); it is added to their variance. A finer model: tds_options=dict(accuracy=...) or a "
                      "larger grid", stacklevel=4)
    return levels, delta, summary


def record(delta, intensity, sigma) -> dict:
    """The summary of an error estimate over all ranks' points: median and largest relative error, largest in
    units of σ, and the share of points above σ/5.

    Args:
        delta (torch.Tensor): the error (N,) e.u./atom of this rank's points.
        intensity (torch.Tensor): I (N,) e.u./atom.
        sigma (torch.Tensor): the data's σ (N,) in e.u./atom (divided by the scale).

    Returns:
        {"estimate", "median_relative", "max_relative", "max_over_sigma", "fraction_above_fifth_sigma"}.
    """
    delta, intensity, sigma = (distributed.gathered(x) for x in (delta, intensity, sigma))
    relative = (delta / torch.clamp(torch.abs(intensity), min=1e-300)).cpu().numpy()
    over = (delta / sigma).cpu().numpy()
    return {"estimate": "|I(grid) − I(1.5 × grid)|", "median_relative": float(np.median(relative)),
            "max_relative": float(relative.max()), "max_over_sigma": float(over.max()),
            "fraction_above_fifth_sigma": float((over > MODEL_ERROR_FRACTION).mean())}
