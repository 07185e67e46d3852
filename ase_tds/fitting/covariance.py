"""The covariance of the fitted θ (not the thermal displacement covariance, `ase_tds.covariance`): a sandwich of the
Gauss–Newton matrix, honest where the data do not see a direction, with the model's own error and a Birge scaling
where χ² says the data's σ are too small; and the FitResult of a finished fit.

Covariance: (JᵀWJ)⁻¹ (JᵀWVWJ + ggᵀ) (JᵀWJ)⁻¹, W the fit's weights and V the variance of the residuals: the data's,
plus for "sampling" the fixed-seed estimate's Monte-Carlo variance (s·stderr)² (also in χ²). g = JᵀW·e carries the
gaussian model's own error e = 2·s·(I(grid) − I(1.5 × grid)), one error shared by all points (θ moves by (JᵀWJ)⁻¹g),
which no number of points averages away. Where W = V⁻¹ and e = 0 this is (JᵀWJ)⁻¹.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import torch

from .. import distributed
from ..uncertainty import parameter_combinations
from . import diagnosis, model_error
from .objective import set_theta
from .result import FitResult

# directions of the (diagonally scaled) Gauss–Newton matrix below this fraction of its largest eigenvalue count as
# undetermined: their variance is at least 1/(CONDITION_FLOOR · λ_max), never the 0 of a pseudo-inverse
CONDITION_FLOOR = 1e-12


def sandwich(normal: np.ndarray, middle: np.ndarray) -> np.ndarray:
    """N⁻¹ M N⁻¹ (k, k), honest where N is singular: a direction the data do not see gets a huge variance.

    A pseudo-inverse would give such a direction variance 0, i.e. a parameter the data cannot determine reported
    with a tiny 1σ (10³σ from the truth, seen on data along one line). Computed in the scaled basis D⁻¹ N D⁻¹,
    D = √diag N, so that the floor does not depend on the units of θ and of the nuisance values.
    """
    d = np.sqrt(np.clip(np.diag(normal), 0, None))
    d = np.where(d > 0, d, 1.0)
    scaled = normal / np.outer(d, d)
    lam, vectors = np.linalg.eigh((scaled + scaled.T) / 2)
    floor = CONDITION_FLOOR * max(lam[-1], 1e-300)
    inverse = (vectors / np.maximum(lam, floor)) @ vectors.T
    cov = inverse @ (middle / np.outer(d, d)) @ inverse
    unseen = vectors[:, lam < floor]
    cov += unseen @ unseen.T / floor
    return cov / np.outer(d, d)


def profiled(normal: np.ndarray, n: int) -> np.ndarray:
    """The Gauss–Newton matrix of θ (first n) with the nuisance values eliminated (Schur complement), (n, n)."""
    a, b, c = normal[:n, :n], normal[:n, n:], normal[n:, n:]
    return a - b @ np.linalg.pinv(c) @ b.T if c.size else a


@torch.no_grad()
def final_evaluation(objective, theta: np.ndarray) -> SimpleNamespace:
    """The fit at θ: intensities, nuisance values, χ² (and Poisson deviance), and the pieces of the sandwich —
    the Gauss–Newton matrix `normal`, the residuals' `middle` and the model error's `systematic` JᵀW·e, all of θ
    and the free nuisance values (θ first), summed over ranks."""
    tds, nuisance = objective.tds, objective.nuisance
    if tds.monte_carlo:
        set_theta(tds.force_constants, theta)
        intensity, stderr = tds.intensity(objective.q)
    else:
        intensity, stderr = objective.intensity(theta), None
    beta = objective.profile(intensity)
    calc, values, deviance = nuisance.model(intensity, beta), nuisance.values(beta), None
    if objective.loss == "poisson":
        deviance = distributed.total(float(objective.value(calc)))
        fit_variance = scatter = torch.clamp(calc, min=1e-300) / objective.exposure  # Poisson: var(I_obs) = m/t
        model_variance = 0.0
    else:  # the scatter is the data's; χ² also counts the model's own error, as the weights do
        fit_variance, scatter, model_variance = 1.0 / objective.w, 1.0 / objective.data_w, objective.model_variance
    if stderr is not None:
        scatter = scatter + (values["scale"] * stderr) ** 2
    chi2 = distributed.total(float(((calc - objective.y) ** 2 / (scatter + model_variance)).sum()))
    jac = torch.cat([values["scale"] * objective.jacobian(theta), nuisance.design(intensity)[1]], dim=1)
    weighted = jac / fit_variance[:, None]
    normal = distributed.total((jac.T @ weighted).cpu().numpy())
    # the model's own error does not scatter from point to point: it enters once, as the shift it gives θ
    middle = distributed.total((weighted.T @ (weighted * scatter[:, None])).cpu().numpy())
    systematic, shift = np.zeros(len(normal)), None
    if tds.has_grid:
        shift = tds.discretisation_error(objective.q, objective.levels, signed=True)  # at the fitted θ
        error = model_error.MODEL_ERROR_COVERAGE * values["scale"] * shift  # data units
        systematic = distributed.total((weighted.T @ error).cpu().numpy())  # JᵀW·error: θ moves by N⁻¹ of it
    return SimpleNamespace(intensity=intensity, values=values, deviance=deviance, chi2=chi2, normal=normal,
                           middle=middle, systematic=systematic, shift=shift, n_free=jac.shape[1])


def with_prior(final: SimpleNamespace, n: int, prior) -> tuple[np.ndarray, np.ndarray]:
    """(normal, middle) with the prior added: one more measurement of each θ_k, of variance σ_p²."""
    if prior is None:
        return final.normal, final.middle
    precision = np.zeros(final.n_free)
    precision[:n] = 1.0 / prior[1] ** 2
    return final.normal + np.diag(precision), final.middle + np.diag(precision)


def theta_covariance(final: SimpleNamespace, n: int, n_points: int, prior):
    """(covariance (n, n), each θ_k's share of variance from the model's own error (n,), the misfit note or "").

    The prior counts as one more measurement of each θ_k (`with_prior`); where χ² says the model misses the data,
    the statistical part is scaled by χ²_red (Birge)."""
    normal, middle = with_prior(final, n, prior)
    statistical = sandwich(normal, middle)[:n, :n]
    model_part = sandwich(normal, middle + np.outer(final.systematic, final.systematic))[:n, :n] - statistical
    dof = max(n_points - final.n_free, 1)
    note = diagnosis.misfit(final.chi2, dof)
    if note:  # the residuals say the data's σ (and so the noise's 1σ) are too small: scale by χ²_red (Birge)
        statistical = statistical * final.chi2 / dof
    cov = statistical + model_part
    share = np.diag(model_part) / np.where(np.diag(cov) > 0, np.diag(cov), 1.0)  # of each θ_k's variance
    return cov, share, note


def fitted_result(objective, theta, iterations: int, history, status: dict, settings: dict, compton) -> FitResult:
    """The FitResult at the fitted θ: the final evaluation, the sandwich covariance and the notes, each also warned.

    Args:
        objective (Objective): the loss of all the points.
        theta (np.ndarray): the fitted θ (n,) eV/Å².
        iterations: the optimiser's iterations, those before a resumed checkpoint included.
        history (list[float]): the loss after each iteration.
        status: {"converged": bool, "reason": text}.
        settings: the fit's settings record.
        compton (bool | Callable): the fit's Compton option.
    """
    fc, n_points = objective.tds.force_constants, objective.n_total
    n = fc.n_params
    final = final_evaluation(objective, theta)
    combinations = parameter_combinations(fc.labels, theta, profiled(final.normal, n))  # the data alone
    cov, share, misfit = theta_covariance(final, n, n_points, objective.prior)
    sigma = np.sqrt(np.clip(np.diag(cov), 0, None))
    corr = cov / np.outer(np.where(sigma > 0, sigma, 1), np.where(sigma > 0, sigma, 1))
    normal = with_prior(final, n, objective.prior)[0]
    notes = diagnosis.identifiability(fc.labels, corr, normal, objective.scale_mode, combinations, objective.prior)
    notes += [misfit] if misfit else []
    notes += _sampling_notes(objective, n_points)
    record, note = _model_error_at_fit(objective, final, share)
    notes += [note] if note else []
    meaningless = _meaningless_sigma(fc.labels, sigma)
    notes += [meaningless] if meaningless else []
    for text in notes:
        warnings.warn(text, stacklevel=3)
    values = final.values
    shape = None
    if values["compton"] is not None:
        from ..background import ComptonShape

        shape = ComptonShape(fc.primitive.get_chemical_symbols()) if compton is True else compton
    dof = max(n_points - final.n_free, 1)
    return FitResult(labels=list(fc.labels), theta=np.asarray(theta, dtype=float), sigma=sigma, covariance=cov,
                     combinations=combinations, correlation=corr, scale=values["scale"],
                     background=values["background"], chi2=final.chi2, chi2_red=final.chi2 / dof, n_points=n_points,
                     iterations=iterations, settings=settings, warnings=notes, history=[float(h) for h in history],
                     compton=values["compton"], deviance=final.deviance, compton_shape=shape, model_error=record,
                     status=status, trusted=not misfit and not meaningless)


SIGMA_MEANINGLESS = 1e4  # eV/Å²: a 1σ beyond this (or not finite) says nothing about any force constant


def _meaningless_sigma(labels, sigma: np.ndarray) -> str:
    """A note where some 1σ are not finite or beyond SIGMA_MEANINGLESS (the normal matrix is numerically singular,
    e.g. at an absurd temperature or |Q|: the data do not constrain them), else ""."""
    bad = [label for label, value in zip(labels, sigma) if not np.isfinite(value) or value > SIGMA_MEANINGLESS]
    if not bad:
        return ""
    return (f"the 1σ of {', '.join(bad)} are not finite or above {SIGMA_MEANINGLESS:g} eV/Å²: the data do not "
            "determine them (check the temperature, the |Q| range and the units of the data), so the fit's "
            "uncertainties are not error bars")


def _sampling_notes(objective, n_points: int) -> list[str]:
    """"sampling": a note when points share a q of the supercell (and so its sampled modes)."""
    tds = objective.tds
    if not tds.monte_carlo:
        return []
    distinct = tds.sampler.distinct_q(torch.stack([distributed.gathered(objective.q[:, k]) for k in range(3)], 1))
    if distinct >= n_points:
        return []
    return [f"sampling: {n_points} points on {distinct} distinct q of the supercell ({n_points / distinct:.1f} per "
            "q); points with one q share its sampled modes, which 1σ treats as independent, so 1σ can understate the "
            "error of θ: many points per q need many samples"]


def finer_model_needed(model_error: dict, accuracy: float | None = None) -> bool:
    """True where the model's own error at the fitted θ (`FitResult.model_error`, with its `at_start`: where the grid
    and crystals were chosen) exceeds a fifth of σ on more points than at the start θ, or, given the model's
    `accuracy`, a relative error above it that is larger than at the start."""
    if "at_start" not in model_error:  # a model without a grid: no error of its own at the fitted θ
        return False
    start = model_error["at_start"]
    if model_error["fraction_above_fifth_sigma"] > start.get("fraction_above_fifth_sigma", 0.0):
        return True
    return accuracy is not None and model_error["max_relative"] > max(accuracy, start.get("max_relative", 0.0))


def _model_error_at_fit(objective, final: SimpleNamespace, share: np.ndarray) -> tuple[dict, str]:
    """The model-error record with the gaussian model's own error at the fitted θ added (that at the start kept as
    `at_start`), and a note when it exceeds σ/5 on more points than at the start ("" otherwise)."""
    start = objective.model_error
    if not objective.tds.has_grid:
        return start, ""
    sigma = 1.0 / torch.sqrt(objective.data_w) / abs(final.values["scale"])
    fitted = model_error.record(torch.abs(final.shift), final.intensity, sigma)
    fitted["largest_share_of_variance"] = float(np.clip(share, 0.0, 1.0).max())
    note = ""
    if finer_model_needed(dict(fitted, at_start=dict(start))):
        note = (f"at the fitted θ the model's own error exceeds a fifth of σ on "
                f"{fitted['fraction_above_fifth_sigma']:.2%} of the points (largest {fitted['max_over_sigma']:.2g} σ; "
                "the grid and crystals were chosen at the start θ); the 1σ carry it. A finer model: fit again from "
                "this θ (the grid and crystals are chosen there), or a smaller accuracy")
    record = dict(start, at_start=dict(start), **fitted)
    record["at_start"].pop("estimate", None)
    return record, note
