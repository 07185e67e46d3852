"""Bragg reflections near measured points: which reflections a crystal allows, the points around them, and Bragg peaks
left in data.

A reflection is a reciprocal-lattice vector G of the crystal, given by its hkl in the cell the data index. It is
allowed when its structure factor with the X-ray form factors, F(G) = Σ_j f_j(|G|) e^{iG·r_j} (f₀ of
`scattering.FormFactors`, xraydb; no Debye–Waller factor, which scales but never cancels a reflection), exceeds
EXTINCT_RTOL · Σ_j f_j(|G|); otherwise it is extinct (e.g. mixed-parity hkl of a conventional fcc cell, (2 0 0) of
diamond) and has no Bragg peak. Distances are Euclidean in hkl (r.l.u., "rlu") or in Q (Å⁻¹, "invA").
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from .structure import integer_matrix, reciprocal_q

UNITS = ("rlu", "invA")
EXTINCT_RTOL = 1e-6
# Bragg peaks left in data (`peaks_left`): points within CORE_RADIUS r.l.u. of an allowed reflection compared with
# those SHELL r.l.u. from it, their intensities times max(d, DISTANCE_FLOOR)² (the diffuse intensity near G falls as
# 1/d², so that product is about flat without a peak); a peak when the core's exceeds PEAK_EXCESS × the shell's median
CORE_RADIUS = 0.05
SHELL = (0.1, 0.25)
DISTANCE_FLOOR = 0.02
PEAK_EXCESS = 100.0
MIN_SHELL_POINTS = 5


def reflections_near(hkl, cell, reach, structure=None, lattice=None) -> np.ndarray:
    """The Bragg reflections within `reach` of the points: hkl (M, 3) in r.l.u. of `cell`, integers.

    Args:
        hkl (array_like): the points (N, 3), r.l.u. of `cell`.
        cell (array_like): lattice vectors (3, 3) Å (rows) the hkl index.
        reach (array_like): (3,) r.l.u. per component: reflections up to this far from a point along each axis.
        structure (Atoms | None): the crystal, in the Cartesian frame of `cell`, whose cell spans the lattice of
            `cell` (the same cell, or a primitive one): its allowed reflections (module docstring).
        lattice (array_like | None): lattice vectors (3, 3) Å of a cell spanning the lattice of `cell` (e.g. the
            primitive cell): every point of its reciprocal lattice. Neither: every integer hkl of `cell`.

    Returns:
        (M, 3) float, the reflections' hkl in r.l.u. of `cell`.

    Raises:
        StructureError: the structure's (or lattice's) cell does not span the lattice of `cell`.
    """
    hkl = np.asarray(hkl, dtype=float)
    steps = [np.arange(-r, r + 1) for r in np.ceil(np.asarray(reach, dtype=float) + 0.5).astype(int)]
    offsets = np.stack(np.meshgrid(*steps, indexing="ij"), axis=-1).reshape(-1, 3)
    cells = np.unique(np.round(hkl).astype(int), axis=0)
    candidates = np.unique((cells[:, None, :] + offsets[None, :, :]).reshape(-1, 3), axis=0)
    own = lattice if structure is None else structure.cell[:]
    if own is None:
        return candidates.astype(float)
    # cell = M · own cell, so hkl = M · (hkl in the own cell): a reflection's own hkl = inv(M) · hkl, integers
    matrix = integer_matrix(cell, own, "the crystal's cell does not span the lattice of the data's cell",
                            "give the crystal of the data, in the same Cartesian frame")
    own_hkl = candidates @ np.linalg.inv(matrix).T
    on_lattice = np.abs(own_hkl - np.round(own_hkl)).max(axis=1) < 1e-6
    candidates, own_hkl = candidates[on_lattice], np.round(own_hkl[on_lattice])
    if structure is None:
        return candidates.astype(float)
    return candidates[allowed(structure, own_hkl)].astype(float)


def allowed(structure, hkl) -> np.ndarray:
    """Which reflections hkl (M, 3) r.l.u. of the structure's cell have a structure factor above extinction.

    Args:
        structure (Atoms): the crystal.
        hkl (array_like): (M, 3) integer r.l.u. of its cell.

    Returns:
        (M,) bool, True = allowed: |F| > EXTINCT_RTOL · Σ_j f_j(|G|).
    """
    hkl = np.asarray(hkl, dtype=float).reshape(-1, 3)
    if len(hkl) == 0:
        return np.zeros(0, dtype=bool)
    from .scattering import FormFactors

    q_norm = np.linalg.norm(reciprocal_q(hkl, structure.cell[:]), axis=1)
    with torch.no_grad():
        form = FormFactors(structure.get_chemical_symbols())(torch.as_tensor(q_norm)).numpy()  # (M, n) e.u.
    phase = np.exp(2j * np.pi * hkl @ structure.get_scaled_positions(wrap=False).T)  # (M, n)
    return np.abs((form * phase).sum(axis=1)) > EXTINCT_RTOL * np.abs(form).sum(axis=1)


def near(hkl, cell, reflections, radius: float, units: str = "rlu") -> np.ndarray:
    """Which points lie within `radius` of a reflection.

    Args:
        hkl (array_like): the points (N, 3), r.l.u. of `cell`.
        cell (array_like): lattice vectors (3, 3) Å (rows).
        reflections (array_like): (M, 3) hkl of the reflections, r.l.u. of `cell`.
        radius: in `units`; ≤ 0 = none.
        units: "rlu" (Euclidean in hkl) or "invA" (Euclidean in Q, Å⁻¹).

    Returns:
        (N,) bool.
    """
    hkl = np.asarray(hkl, dtype=float)
    if radius <= 0 or len(reflections) == 0:
        return np.zeros(len(hkl), dtype=bool)
    to_space = (lambda x: x) if units == "rlu" else (lambda x: reciprocal_q(x, cell))
    distance, _ = cKDTree(to_space(np.asarray(reflections, dtype=float))).query(to_space(hkl),
                                                                                  distance_upper_bound=radius)
    return distance <= radius


def reach(radius: float, units: str, cell) -> np.ndarray:
    """(3,) r.l.u. per component that a sphere of `radius` (`units`) spans: hkl_i = Q·a_i/2π, |Δhkl_i| ≤ r|a_i|/2π."""
    if units == "rlu":
        return np.full(3, max(radius, 0.0))
    return max(radius, 0.0) * np.linalg.norm(np.asarray(cell, dtype=float), axis=1) / (2 * np.pi)


def peaks_left(hkl, intensity, reflections) -> list[tuple[np.ndarray, float]]:
    """The reflections whose nearest points hold a Bragg peak: intensities far above their neighbourhood's.

    Around each reflection, the points within CORE_RADIUS r.l.u. are compared with those in the SHELL (at least
    MIN_SHELL_POINTS), each intensity times max(d, DISTANCE_FLOOR)² (d its distance in r.l.u.), which the diffuse
    intensity, falling as 1/d², keeps about flat: the largest core value over the shell's median is the excess, and
    above PEAK_EXCESS the reflection's peak is in the data.

    Args:
        hkl (array_like): the used points (N, 3), r.l.u.
        intensity (array_like): their intensities (N,).
        reflections (array_like): (M, 3) hkl of the allowed reflections, r.l.u.

    Returns:
        [(hkl (3,), excess)] of the reflections with a peak, largest excess first.
    """
    hkl, intensity = np.asarray(hkl, dtype=float), np.asarray(intensity, dtype=float)
    if len(reflections) == 0 or len(hkl) == 0:
        return []
    distance, nearest = cKDTree(np.asarray(reflections, dtype=float)).query(hkl, distance_upper_bound=SHELL[1])
    close = np.flatnonzero(np.isfinite(distance))
    close = close[np.argsort(nearest[close], kind="stable")]  # the points around each reflection, together
    groups = np.split(close, np.flatnonzero(np.diff(nearest[close])) + 1) if len(close) else []
    found = []
    for around in groups:
        g = nearest[around[0]]
        d, weighted = distance[around], intensity[around] * np.maximum(distance[around], DISTANCE_FLOOR) ** 2
        core, shell = weighted[d <= CORE_RADIUS], weighted[d >= SHELL[0]]
        if len(core) == 0 or len(shell) < MIN_SHELL_POINTS or np.median(shell) <= 0:
            continue
        excess = float(core.max() / np.median(shell))
        if excess > PEAK_EXCESS:
            found.append((np.asarray(reflections[g], dtype=float), excess))
    return sorted(found, key=lambda item: -item[1])
