"""What a fit says when something is wrong: an unstable start (where its most imaginary mode lies), a misfit (χ² far
above its expectation), and parameters the data do not determine or cannot tell apart."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..covariance import UnstableError, mesh_q
from ..structure import reduced_q
from .objective import set_theta

# χ² more than this many of its standard deviations √(2·dof) above dof: the model does not describe the data
MISFIT_SIGMAS = 5.0


def instability(model, mesh: int = 8) -> str:
    """Where the model's current θ is unstable: the most imaginary frequency on a Γ-centred mesh³ (text)."""
    q = mesh_q(model, (mesh,) * 3)[1:]  # Γ (three zero modes) left out
    freqs = model.frequencies(q)
    k, band = np.unravel_index(np.argmin(freqs), freqs.shape)
    if freqs[k, band] > -1e-3:
        return (f"no imaginary frequency on a {mesh}×{mesh}×{mesh} mesh, so the instability lies between its points "
                "(long waves, or a q of the sampler's supercell)")
    hkl = reduced_q(q[k].cpu().numpy(), model.unitcell.cell[:])
    count = int((freqs.min(axis=1) < -1e-3).sum())
    return (f"imaginary frequency {-freqs[k, band]:.3f}i THz at hkl = {np.round(hkl, 3).tolist()} (r.l.u. of the "
            f"model's cell), {count} of {len(q)} q of a {mesh}×{mesh}×{mesh} mesh imaginary")


def unstable_start(model, theta, original, err, where: str) -> UnstableError:
    """The error for an unstable start θ, naming its most imaginary mode; `model` is left at `original`.

    Args:
        model (ForceConstantModel): the model fitted.
        theta (array_like): the unstable θ (n,) eV/Å².
        original (array_like): the θ (n,) the model is left at (the start the user gave).
        err (UnstableError): the error met.
        where: what θ was, e.g. " (θ of the first fit)"; "" for the start itself.
    """
    set_theta(model, theta)
    report = instability(model)
    set_theta(model, original)
    return UnstableError(f"the starting force constants are dynamically unstable{where}: {report} ({err}). "
                         "Start from springs (set_from_springs() / --start springs), a calculator "
                         "(set_from_calculator(calc) / --start emt or calculator:module.Class), a stable phonopy file, "
                         "or scaled-down constants")


@contextmanager
def named_if_unstable(model, theta=None, original=None, where: str = ""):
    """An UnstableError met inside re-raised by `unstable_start`, naming θ's most imaginary mode.

    Args:
        model (ForceConstantModel): the model fitted.
        theta (array_like | None): the θ (n,) eV/Å² met unstable (default: the model's θ on entry).
        original (array_like | None): the θ the model is left at (default: `theta`).
        where: what θ was, as `unstable_start`'s.
    """
    theta = model.theta.detach().cpu().numpy().copy() if theta is None else theta
    try:
        yield
    except UnstableError as err:
        raise unstable_start(model, theta, theta if original is None else original, err, where) from err


def misfit(chi2: float, dof: int) -> str:
    """A note when χ² is far above its expectation (and the 1σ are then scaled by √χ²_red), else ""."""
    excess = (chi2 - dof) / np.sqrt(2 * dof)
    if excess <= MISFIT_SIGMAS:
        return ""
    return (f"χ²_red = {chi2 / dof:.3g}, {excess:.0f} standard deviations of χ² above 1: the model misses the data by "
            "more than their σ allow — a local minimum (fit again from another start: springs with another Debye "
            "temperature, or a calculator), understated errors of the data, or physics the model leaves out; "
            f"the 1σ are scaled by √χ²_red = {np.sqrt(chi2 / dof):.3g}")


def identifiability(labels, corr, normal, scale_mode, combinations, prior) -> list[str]:
    """Notes on what the data do not determine: undetermined combinations, a free scale, (near) degeneracy and
    strongly correlated pairs.

    Args:
        labels (Sequence[str]): (n,) the parameter labels.
        corr (np.ndarray): the correlation (k, k) of θ and the nuisance values (θ first).
        normal (np.ndarray): the Gauss–Newton matrix (k, k).
        scale_mode: "free" | "fixed".
        combinations (list[dict]): `uncertainty.parameter_combinations` of the profiled matrix.
        prior (tuple | None): (θ₀, σ_p) of the ridge, or None.
    """
    notes = []
    for combo in combinations:
        if not combo["determined"]:
            held = (f"the prior (σ_p = {prior[1]:.3g} eV/Å²) holds it near the start" if prior is not None
                    else "a prior (prior_sigma= / --prior-sigma) would hold it near the start")
            size = f"{combo['relative']:.0%}" if combo["relative"] < 10 else f"{combo['relative']:.2g}×"
            notes.append(f"the data do not determine {combo['text']}: 1σ {combo['sigma']:.3g} eV/Å² from the data "
                         f"alone, {size} of the largest constant; {held}")
    if scale_mode == "free":
        notes.append("the intensity scale is free: the overall magnitude of the force constants is then set only "
                     "by the Debye–Waller and multi-phonon terms, and is correlated with the scale")
    eig = np.linalg.eigvalsh(normal)
    if eig[0] <= 1e-12 * eig[-1]:
        condition = eig[-1] / eig[0] if eig[0] > 1e-300 * eig[-1] else np.inf
        notes.append(f"the parameters are (nearly) degenerate: condition number {condition:.3g}")
    n = len(labels)
    for i in range(n):
        for j in range(i + 1, n):
            if abs(corr[i, j]) > 0.98:
                notes.append(f"{labels[i]} and {labels[j]} are strongly correlated (ρ = {corr[i, j]:+.3f})")
    return notes
