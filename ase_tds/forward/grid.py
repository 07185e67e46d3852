"""Periodic crystals of a forward model: the grid check, distances to Bragg peaks, and the grid converged for a
crystal (docs/theory.md, "Convergence")."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ..structure import reciprocal_vectors, reduced_q

# Grid selection (converged_grid): starting mesh spacing (Å⁻¹), the factor between candidates, the largest
# grid, and the relative change between a grid and one 1.5× larger that counts as converged.
START_SPACING = 0.45
GRID_STEP = 1.25
MAX_CELLS = 40
ACCURACY = 1e-3
# |Q| range of the probe points that choose the grid, Å⁻¹ (|Q| ≤ Q_MAX, or the data's largest |Q|)
Q_MAX = 8.0


def check_grid(grid) -> tuple[int, int, int]:
    """grid as three positive ints (L1, L2, L3).

    Raises:
        ValueError: anything else.
    """
    try:
        grid = tuple(int(x) for x in np.ravel(grid))
    except (TypeError, ValueError):
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive numbers of primitive cells (L1, L2, L3), got {grid!r}")
    return grid


def larger(grid, factor: float = 1.5) -> tuple[int, int, int]:
    """grid × factor, rounded up: the comparison crystal of the model's own error estimate."""
    return tuple(int(np.ceil(factor * x)) for x in grid)


def bragg_distance(primitive, q: torch.Tensor) -> torch.Tensor:
    """|Q − G| (B,) Å⁻¹ to the nearest reciprocal-lattice vector G of the primitive cell, for q (B, 3) Å⁻¹.

    Args:
        primitive (ase.Atoms): the primitive cell.
        q: Cartesian Q (B, 3) Å⁻¹.

    Returns:
        |Q − G|, (B,) Å⁻¹.
    """
    recip = torch.as_tensor(reciprocal_vectors(primitive.cell[:]), dtype=q.dtype, device=q.device)
    nearest = torch.round(reduced_q(q, primitive.cell[:]))
    distance = torch.full((len(q),), torch.inf, dtype=q.dtype, device=q.device)
    for offset in itertools.product((-1, 0, 1), repeat=3):  # one neighbour of the rounded G at a time: memory O(B)
        g = (nearest + torch.as_tensor(offset, dtype=q.dtype, device=q.device)) @ recip
        distance = torch.minimum(distance, torch.linalg.norm(q - g, dim=-1))
    return distance


def probe_q(primitive, q_max: float, count: int = 192, seed: int = 0) -> np.ndarray:
    """Cartesian Q (count, 3) Å⁻¹, uniform in the ball |Q| ≤ q_max, at least a quarter of the shortest reciprocal
    vector from any Bragg peak: where the grid alone (no refinement) must be converged.

    Args:
        primitive (ase.Atoms): the primitive cell.
        q_max: Å⁻¹, the radius of the ball.
        count: the number of points.
        seed: of the random number generator (the same points for the same arguments).

    Returns:
        Cartesian Q (count, 3) Å⁻¹.
    """
    rng = np.random.default_rng(seed)
    far = 0.25 * np.linalg.norm(reciprocal_vectors(primitive.cell[:]), axis=1).min()
    out = np.zeros((0, 3))
    while len(out) < count:
        x = rng.normal(size=(4 * count, 3))
        x *= (q_max * rng.uniform(0.2, 1.0, size=len(x)) ** (1 / 3) / np.linalg.norm(x, axis=1))[:, None]
        keep = bragg_distance(primitive, torch.as_tensor(x)).numpy() > far
        out = np.concatenate([out, x[keep]])
    return out[:count]


@torch.no_grad()
def converged_grid(model, q_max: float = Q_MAX) -> tuple[int, int, int]:
    """The smallest grid (mesh spacing START_SPACING Å⁻¹, then ÷ GRID_STEP) whose intensities at the probe points
    (`probe_q`) change by at most `model.accuracy` (relative, largest) on a grid 1.5× larger; at most MAX_CELLS
    cells per axis. Uses the force constants as they are at the call (a fit: its start).

    Args:
        model (GaussianModel): the model whose grid is chosen (its force constants, options and `accuracy`); it
            must have `rebuilt(grid=..., refine=False)`.
        q_max: Å⁻¹, the largest |Q| of the probe points.

    Returns:
        (L1, L2, L3) primitive cells.

    Raises:
        UnstableError: the force constants are not dynamically stable.
    """
    fc = model.force_constants
    recip = np.linalg.norm(reciprocal_vectors(fc.primitive.cell[:]), axis=1)
    q = torch.as_tensor(probe_q(fc.primitive, q_max), dtype=fc.dtype, device=fc.device)
    spacing = START_SPACING
    while True:
        grid = tuple(int(x) for x in np.minimum(np.ceil(recip / spacing), MAX_CELLS))
        if max(grid) >= MAX_CELLS:
            return grid
        coarse = model.rebuilt(grid=grid, refine=False)(q)
        change = torch.abs(coarse / model.rebuilt(grid=larger(grid), refine=False)(q) - 1).max().item()
        if change <= model.accuracy:
            return grid
        spacing /= GRID_STEP
