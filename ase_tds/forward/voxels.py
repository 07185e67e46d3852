"""Points on a regular hkl grid: the periodic crystal on whose reciprocal lattice they all lie (docs/theory.md,
"FFT route for volumes").

A voxel hkl = h0 + (i, j, k)/N of a volume, in reduced coordinates r_i = Q·a_i/2π of the primitive cell, is rational;
the smallest L_i with L_i·r_i an integer for every voxel makes the L1×L2×L3 periodic crystal whose q mesh holds
every voxel (Q = G + q, G a reciprocal-lattice vector of the primitive cell, q on the mesh). A grid with gaps, or any
subset of a grid's points, gives the same crystal or a smaller one.
"""

from __future__ import annotations

from fractions import Fraction
import math

import numpy as np
import torch

from ..structure import reduced_q

# the largest commensurate crystal considered, primitive cells per axis (beyond it: not a grid, the per-point route)
MAX_AXIS = 256
# r.l.u. of the primitive cell: how far a reduced coordinate may lie from its rational value p/L_i
GRID_TOLERANCE = 1e-6
# a commensurate crystal up to FFT_CELLS cells always pays for the FFT route, a larger one with at least one point per
# CELLS_PER_POINT cells (a cell costs the FFT route ~M ≈ 100 numbers; a point the per-point route ~10³–10⁴ terms)
FFT_CELLS = 16**3
CELLS_PER_POINT = 8
INDEX_CHUNK = 2**20  # points whose lattice indices are worked out together


def commensurate_grid(q, primitive_cell, max_axis: int = MAX_AXIS,
                      tolerance: float = GRID_TOLERANCE) -> tuple[int, int, int] | None:
    """The smallest (L1, L2, L3) whose periodic crystal has every Q on its reciprocal lattice: L_i·(Q·a_i/2π) an
    integer within `tolerance`·L_i; None where some L_i would exceed `max_axis` (points not on a regular grid).

    Args:
        q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹.
        primitive_cell (array_like): the primitive lattice vectors a_i (3, 3) Å as rows.
        max_axis: the largest L_i considered.
        tolerance: r.l.u. of the primitive cell, the largest distance of a reduced coordinate from p/L_i.

    Returns:
        (L1, L2, L3) primitive cells, or None.
    """
    if isinstance(q, torch.Tensor):
        q = q.detach().cpu().numpy()
    reduced = reduced_q(np.asarray(q, dtype=float).reshape(-1, 3), primitive_cell)
    if not len(reduced) or not np.isfinite(reduced).all():
        return None
    grid = []
    for values in reduced.T:
        fraction = values - np.floor(values + tolerance)  # in [−tolerance, 1 − tolerance)
        distinct = np.unique(np.round(fraction, 9))
        distinct = distinct[np.concatenate([[True], np.diff(distinct) > tolerance])]
        if len(distinct) > max_axis:
            return None
        denominators = []
        for value in distinct:
            rational = Fraction(float(value)).limit_denominator(max_axis)
            if abs(value - float(rational)) > tolerance:
                return None
            denominators.append(rational.denominator)
        axis = math.lcm(*denominators)
        if axis > max_axis:
            return None
        grid.append(axis)
    return tuple(grid)


def volume_grid(q, primitive_cell) -> tuple[int, int, int] | None:
    """The points' commensurate crystal (`commensurate_grid`) where the FFT route pays: at most CELLS_PER_POINT cells
    per point, or FFT_CELLS; None otherwise (points off a grid, or too few for their crystal: the per-point route).

    Args:
        q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹.
        primitive_cell (array_like): the primitive lattice vectors (3, 3) Å as rows.

    Returns:
        (L1, L2, L3) primitive cells, or None.
    """
    grid = commensurate_grid(q, primitive_cell)
    if grid is None or int(np.prod(grid)) > max(CELLS_PER_POINT * len(q), FFT_CELLS):
        return None
    return grid


def lattice_index(q: torch.Tensor, primitive_cell, grid, tolerance: float = GRID_TOLERANCE) -> torch.Tensor:
    """n (B, 3) int64: Q = Σ n_i b_i / L_i, each Q's integer coordinates on the reciprocal lattice of the L1×L2×L3
    crystal (b_i the primitive reciprocal vectors); `mesh_index` is n mod L. Arguments and errors as `mesh_index`."""
    grid_t = torch.as_tensor(grid, dtype=q.dtype, device=q.device)
    n = torch.empty((len(q), 3), dtype=torch.long, device=q.device)
    for start in range(0, len(q), INDEX_CHUNK):  # a chunk at a time: the temporaries do not scale with the volume
        scaled = reduced_q(q[start:start + INDEX_CHUNK], primitive_cell) * grid_t
        nearest = torch.round(scaled)
        off = ((scaled - nearest).abs() > tolerance * grid_t).any(dim=1)
        if off.any():
            first = start + int(torch.nonzero(off)[0, 0])
            raise ValueError(f"Q = {q[first].tolist()} Å⁻¹ (point {first}) is not on the reciprocal lattice of the "
                             f"{'×'.join(map(str, grid))} crystal of the fft model: its points must lie on the regular "
                             "grid the model was built for (voxels=...); use the per-point 'gaussian' model for other "
                             "points")
        n[start:start + INDEX_CHUNK] = nearest
    return n


def mesh_index(q: torch.Tensor, primitive_cell, grid, tolerance: float = GRID_TOLERANCE) -> torch.Tensor:
    """m (B, 3) int64 in [0, L_i): the q-mesh point of each Q = G + q, q = Σ m_i b_i / L_i, of the L1×L2×L3 crystal.

    Args:
        q: Cartesian Q (B, 3) Å⁻¹.
        primitive_cell (array_like): the primitive lattice vectors (3, 3) Å as rows.
        grid (tuple[int, int, int]): (L1, L2, L3) primitive cells.
        tolerance: r.l.u. of the primitive cell, as `commensurate_grid`.

    Returns:
        m, (B, 3) int64.

    Raises:
        ValueError: a Q that is not on the crystal's reciprocal lattice (the message names the first).
    """
    n = lattice_index(q, primitive_cell, grid, tolerance)
    return torch.remainder(n, torch.as_tensor(grid, device=q.device))
