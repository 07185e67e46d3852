"""Synthetic TDS from force constants: `simulate` (any forward model, optional Poisson noise) and random points."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from ..data import ABSOLUTE_UNITS, TDSData, add_poisson_noise
from ..structure import BRAGG_TOLERANCE, on_bragg_peaks, reciprocal_q
from .table import tds_model


def points_in_sphere(model, n: int, q_max: float, rng=None) -> np.ndarray:
    """n random hkl (n, 3) in r.l.u. of `model.unitcell`, uniform in the ball |Q| ≤ q_max: points for synthetic data.

    Args:
        model (ForceConstantSource): the force constants (their `unitcell` and `q_from_hkl`).
        n: how many points.
        q_max: the ball's radius, Å⁻¹.
        rng (numpy.random.Generator | int | None): random numbers (or their seed).

    Returns:
        hkl (n, 3), r.l.u. of the unit cell.
    """
    rng = np.random.default_rng(rng)
    box = q_max * np.linalg.norm(model.unitcell.cell[:], axis=1) / (2 * np.pi)
    points = []
    while sum(len(p) for p in points) < n:
        hkl = rng.uniform(-box, box, size=(4 * n, 3))
        points.append(hkl[np.linalg.norm(model.q_from_hkl(hkl), axis=1) <= q_max])
    return np.concatenate(points)[:n]


def simulate(model: ForceConstantSource, hkl, temperature: float, method: str = "gaussian", statistics: str = "quantum",
             cell=None, counts: float | None = None, rng=None, tds_options: dict | None = None) -> TDSData:
    """Synthetic TDS in absolute units (e.u./atom) at hkl (N, 3) from force constants `model`: a
    ForceConstantModel, or a PhonopyForceConstants (phonopy's force constants used as they are).

    hkl in r.l.u. of `cell` (default the model's unit cell); counts: Poisson noise with the mean
    intensity at that many counts (σ written alongside), None for noise-free data.
    A model with a grid chooses it for the largest |Q| (`GaussianModel`, `converged_grid`); hkl on a regular grid take
    the FFT route of the all-order model ("fft", `tds_model`); `provenance` records
    the model's settings and its own error estimate (`ForwardModel.discretisation_error`: median and largest
    relative). A Monte-Carlo model (method "sampling", give tds_options=dict(sampler=...)): σ holds the standard
    error of the sampled mean (floored at 1e-9 of the largest |I|, for Q where every sample scatters alike, e.g.
    Q = 0), added in quadrature to the counting σ when counts are given.

    Args:
        model (ForceConstantModel | PhonopyForceConstants): the force constants.
        hkl (array_like): (N, 3) r.l.u. of `cell`.
        temperature: K.
        method: a forward model's name (`ase_tds.forward.MODELS`): "one-phonon", "gaussian" or "sampling".
        statistics: "quantum" (Bose–Einstein) or "classical" phonon occupation.
        cell (array_like | None): lattice vectors (3, 3) Å as rows; None = the model's unit cell.
        counts: counts at the mean intensity for Poisson noise; None = noise-free.
        rng (np.random.Generator | int | None): numpy Generator or seed for the noise; None = fresh entropy.
        tds_options: further keyword arguments of the forward model (e.g. sampler, grid, dw_mesh); None = defaults.

    Returns:
        TDSData in e.u./atom at the N points, with temperature, provenance and (with noise or sampling) σ.

    Raises:
        ValueError: an unknown method or statistics, or invalid model options.
        UnstableError: force constants that are not dynamically stable (imaginary modes).
    """
    theta = getattr(model, "theta", None)
    if theta is not None and theta.numel() and not bool(theta.detach().any()):
        raise ValueError("the model's force constants are all zero: a crystal without forces has no thermal diffuse "
                         "scattering; set them first (set_from_bvk, set_from_calculator, from_phonopy)")
    cell = np.array(model.unitcell.cell[:] if cell is None else cell, dtype=float)
    q = reciprocal_q(hkl, cell)
    options = dict(tds_options or {})
    options.setdefault("q_max", float(np.linalg.norm(q, axis=1).max()))
    options.setdefault("voxels", q)  # on a regular grid: the fft route (`tds_model`)
    tds = tds_model(model, temperature, method=method, statistics=statistics, **options)
    with torch.no_grad():
        intensity, stderr = (None if x is None else x.cpu().numpy() for x in tds.intensity(q))
        delta = tds.discretisation_error(q).cpu().numpy()
    peaks = int(on_bragg_peaks(q, model.primitive.cell[:]).sum())
    if peaks:  # said once the intensities are had: a refusal of the model comes first
        warnings.warn(f"{peaks} of {len(q)} hkl lie on Bragg peaks (within {BRAGG_TOLERANCE:g} r.l.u. of a "
                      "reciprocal-lattice vector of the primitive cell), where the diffuse intensity is not "
                      "defined apart from the peak: their values are not data to fit (mask them, "
                      "TDSData.mask_bragg)", stacklevel=2)
    if stderr is not None:
        stderr = np.maximum(stderr, max(1e-9 * np.abs(intensity).max(), np.finfo(float).tiny))
    relative = delta / np.maximum(np.abs(intensity), np.finfo(float).tiny)
    provenance = {"model": tds.settings(), "force_constants": repr(model),
                  "model_error": {"estimate": "|I(grid) − I(1.5 × grid)|" if tds.has_grid else "none",
                                  "median_relative": float(np.median(relative)),
                                  "max_relative": float(relative.max())}}
    data = TDSData.from_hkl(hkl, intensity, cell, sigma=stderr, temperature=temperature, units=ABSOLUTE_UNITS,
                            source="simulated", provenance=provenance)
    if counts is None:
        return data
    noisy = add_poisson_noise(data, counts, rng)
    if stderr is None:
        return noisy
    return dataclasses.replace(noisy, sigma=np.hypot(noisy.sigma, stderr))
