"""The all-order ("gaussian") model, exact for a harmonic crystal and converged by default (docs/theory.md).

The diffuse intensity of a periodic crystal of L1×L2×L3 primitive cells, consistent in itself (its Debye–Waller
factor, first order and higher orders all from its own q mesh), evaluated at any Q by a smooth window over the
lattice (`LatticeWindow`); points near Bragg peaks use crystals two or three times as large. The grid is chosen for
the crystal at construction (`converged_grid`) unless given.

Why a periodic crystal's own Debye–Waller factor: its q mesh lacks the longest waves (the cell around Γ). An
infinite crystal has them, but a wave much longer than the range of the pair correlations moves neighbouring
atoms together: it lowers e^{−2W} and raises every e^{X} by the same factor, and the two cancel away from Bragg
peaks. Mixing a converged W with the grid's X breaks that cancellation (−1.6 % for Ni at L = 9); keeping both from
one grid makes the intensity converge fast in L (docs/theory.md, "Convergence").
"""

from __future__ import annotations

import numpy as np
import torch

from ..chunks import map_chunks, matrix_chunk
from ..scattering import DebyeWaller, LatticeWindow, one_phonon_intensity
from ..structure import reciprocal_vectors
from .base import ForwardModel
from .grid import ACCURACY, Q_MAX, bragg_distance, check_grid, converged_grid, larger

# Near Bragg peaks the diffuse intensity varies on the scale of the mesh: a point closer to one than
# NEAR_BRAGG[k] mesh spacings uses the grid GRID_FACTORS[k + 1] times as large.
NEAR_BRAGG = (2.5, 1.25)
GRID_FACTORS = (1, 2, 3, 4)  # the last: only for points a fit finds too coarse (`levels` of `forward`)


class GaussianModel(ForwardModel):
    """All-order I(Q) (B,) e.u./atom at Cartesian Q (B, 3) Å⁻¹.

    Args:
        force_constants (ForceConstantSource): as `ForwardModel`.
        temperature (float): K, as `ForwardModel`.
        statistics (str): as `ForwardModel`.
        form_factors (str | Mapping): as `ForwardModel`.
        chunk (int | None): as `ForwardModel`.
        grid (tuple[int, int, int] | None): (L1, L2, L3) primitive cells of the periodic crystal; None chooses it
            (`converged_grid`: the smallest grid whose intensities change by less than `accuracy` on a 1.5× larger
            one, at probe points with |Q| ≤ q_max).
        refine: points within NEAR_BRAGG mesh spacings of a Bragg peak use grids 2 or 3 times as large
            (False: one grid, the exact periodic crystal at Q on its reciprocal lattice).
        accuracy: the relative change that counts as converged when the grid is chosen, in (0, 1).
        q_max: Å⁻¹, the largest |Q| of the probe points that choose the grid.

    Raises:
        ValueError: a bad grid or accuracy (and as `ForwardModel`).
        UnstableError: choosing the grid met force constants that are not dynamically stable.
    """

    name = "gaussian"
    has_grid = True

    def __init__(self, force_constants, temperature: float, statistics: str = "quantum", form_factors="xraydb",
                 chunk: int | None = None, grid=None, refine: bool = True, accuracy: float = ACCURACY,
                 q_max: float = Q_MAX):
        super().__init__(force_constants, temperature, statistics, form_factors, chunk)
        if not (np.isfinite(accuracy) and 0 < accuracy < 1):
            raise ValueError(f"accuracy must be a relative error in (0, 1), e.g. 1e-3; got {accuracy!r}")
        self.refine = bool(refine)
        self.accuracy = float(accuracy)
        self._windows = {}
        self.grid = None if grid is None else check_grid(grid)
        if self.grid is None:
            self.grid = converged_grid(self, q_max)

    def level_grid(self, level: int) -> tuple[int, int, int]:
        """The periodic crystal of `level`: `grid` × GRID_FACTORS[level] (levels > 0 near Bragg peaks).

        Args:
            level: 0 the grid, k its GRID_FACTORS[k]-fold enlargement.

        Returns:
            (L1, L2, L3) primitive cells.
        """
        return tuple(int(x) * GRID_FACTORS[level] for x in self.grid)

    def grid_covariance(self, level: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(C_{κ0,κ'l} (G, n, n, 3, 3) Å² of the crystal `level_grid(level)` in FFT order, and its self covariance
        (n, 3, 3) Å²).

        Args:
            level: the crystal, 0 the grid, k its GRID_FACTORS[k]-fold enlargement (`level_grid`).

        Returns:
            correlation: C_{κ0,κ'l}, (G, n, n, 3, 3) Å², G the number of cells of the crystal.
            self_covariance: C_{κ0,κ0}, (n, 3, 3) Å².

        Raises:
            UnstableError: D(q) is not positive definite at some q of the crystal's mesh.
        """
        def compute():
            crystal = self.covariance.real_space(self.level_grid(level))
            return crystal.correlation, crystal.self_covariance()

        return self._at_fixed_theta(f"grid{level}", compute)

    def _window(self, level: int) -> LatticeWindow:
        fc = self.force_constants
        key = (level, fc.dtype, fc.device)
        if key not in self._windows:
            self._windows[key] = LatticeWindow(fc.primitive, self.level_grid(level), fc.dtype, fc.device)
        return self._windows[key]

    @property
    def mesh_spacing(self) -> float:
        """The largest spacing of the grid's q mesh, Å⁻¹: |b_i| / L_i."""
        recip = np.linalg.norm(reciprocal_vectors(self.force_constants.primitive.cell[:]), axis=1)
        return float(np.max(recip / np.array(self.grid)))

    def levels(self, q: torch.Tensor) -> torch.Tensor:
        """(B,) the level each Q uses: k within NEAR_BRAGG[k − 1] mesh spacings of a Bragg peak (if `refine`), else 0.

        Args:
            q: Cartesian Q (B, 3) Å⁻¹.

        Returns:
            The level of each Q, (B,) int64.
        """
        level = super().levels(q)
        if self.refine:
            distance = bragg_distance(self.force_constants.primitive, q) / self.mesh_spacing
            for k, near in enumerate(NEAR_BRAGG, start=1):
                level = torch.where(distance < near, k, level)
        return level

    def forward(self, q, levels=None) -> torch.Tensor:
        """I(Q) (B,) e.u./atom at Cartesian q (B, 3) Å⁻¹ (array or tensor; reshaped to (-1, 3)).

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹.
            levels (array_like | torch.Tensor | None): (B,) int, the crystal each Q uses (None: `levels(q)`): 0 the
                grid, k its GRID_FACTORS[k]-fold enlargement.

        Returns:
            I(Q), (B,) e.u. per atom.

        Raises:
            ValueError: levels that are not one integer per Q in 0..len(GRID_FACTORS) − 1.
            UnstableError: the force constants are not dynamically stable.
        """
        q = self.as_q(q)
        levels = self.levels(q) if levels is None else torch.as_tensor(levels, device=q.device).reshape(-1)
        if len(levels) != len(q) or (len(q) and (levels.min() < 0 or levels.max() >= len(GRID_FACTORS))):
            raise ValueError(f"levels must be one integer per Q in 0..{len(GRID_FACTORS) - 1}")
        out = torch.zeros(len(q), dtype=q.dtype, device=q.device)
        for level in range(len(GRID_FACTORS)):
            pick = torch.nonzero(levels == level)[:, 0]
            if len(pick):
                out = out.index_put((pick,), self._all_orders(q[pick], level))
        return out

    def _all_orders(self, q: torch.Tensor, level: int) -> torch.Tensor:
        """The periodic crystal of `level`: I₁ with its own W, plus its windowed higher orders."""
        correlation, self_cov = self.grid_covariance(level)
        window = self._window(level)
        terms = window.gather(correlation)
        amplitude = self.amplitude(q, DebyeWaller(self_cov))
        first = map_chunks(lambda qc, amp: one_phonon_intensity(self.covariance, qc, amp),
                           (q, amplitude), self._chunk or matrix_chunk(self.force_constants.n_atoms))
        higher = map_chunks(lambda qc, amp: window.intensity(qc, amp, terms), (q, amplitude),
                            self._chunk or max(2**21 // window.n_terms, 8))
        return torch.cat(first) + torch.cat(higher)

    @torch.no_grad()
    def discretisation_error(self, q, levels=None, signed: bool = False) -> torch.Tensor:
        """Estimated error (B,) e.u./atom of I(Q) from the finite grid: |I − I'| with I' from grids 1.5× larger
        at the same `levels`.

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹ (reshaped to (-1, 3)).
            levels (array_like | torch.Tensor | None): (B,) the crystal each Q uses, as in `forward`; None:
                `levels(q)`.
            signed: give I − I' itself (its sign says which way the model errs; `fit` propagates it to θ).

        Returns:
            |I − I'| (or I − I'), (B,) e.u. per atom.
        """
        q = self.as_q(q)
        levels = self.levels(q) if levels is None else levels
        difference = self(q, levels) - self.with_grid(larger(self.grid))(q, levels)
        return difference if signed else torch.abs(difference)

    def with_grid(self, grid) -> GaussianModel:
        """This model with another grid (None: chosen by `converged_grid`)."""
        return self.rebuilt(grid=grid)

    def options(self) -> dict:
        return {**super().options(), "grid": self.grid, "refine": self.refine, "accuracy": self.accuracy}

    def settings(self) -> dict:
        near = [list(self.level_grid(k)) for k in range(1, len(NEAR_BRAGG) + 1)] if self.refine else []
        return {**super().settings(), "grid": list(self.grid), "refine": self.refine, "accuracy": self.accuracy,
                "near_bragg_grids": near}

    @classmethod
    def settings_options(cls, force_constants, settings: dict) -> dict:
        return {key: settings[key] for key in ("grid", "refine", "accuracy") if settings.get(key) is not None}
