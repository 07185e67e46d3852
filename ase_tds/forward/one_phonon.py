"""The one-phonon model: I₁(Q) at any Q, with the converged Debye–Waller factor (docs/theory.md, "Forward models").

Per-Q Cholesky solves of D(Q) (classical) or a degeneracy-safe matrix function (quantum); the Debye–Waller factor
from a Brillouin-zone mesh extrapolated in its size (`dw_mesh`), or the periodic crystal `grid`'s own mesh.
"""

from __future__ import annotations

import numpy as np
import torch

from ..chunks import map_chunks, matrix_chunk
from ..scattering import DebyeWaller, one_phonon_intensity
from .base import ForwardModel
from .grid import check_grid


class OnePhononModel(ForwardModel):
    """I₁(Q) (B,) e.u./atom at Cartesian Q (B, 3) Å⁻¹ (first order only).

    Args:
        force_constants (ForceConstantSource): as `ForwardModel`.
        temperature (float): K, as `ForwardModel`.
        statistics (str): as `ForwardModel`.
        form_factors (str | Mapping): as `ForwardModel`.
        chunk (int | None): as `ForwardModel`.
        dw_mesh (int | str): int m (meshes m³ and (2m)³, Richardson-extrapolated) or "grid" (the mesh of `grid`).
        grid (tuple[int, int, int] | None): (L1, L2, L3), the mesh for dw_mesh="grid" (unused otherwise).

    Raises:
        ValueError: a bad dw_mesh or grid (and as `ForwardModel`).
    """

    name = "one-phonon"

    def __init__(self, force_constants, temperature: float, statistics: str = "quantum", form_factors="xraydb",
                 chunk: int | None = None, dw_mesh=12, grid=None):
        super().__init__(force_constants, temperature, statistics, form_factors, chunk)
        if not (dw_mesh == "grid" or (isinstance(dw_mesh, (int, np.integer)) and dw_mesh >= 1)):
            raise ValueError(f"dw_mesh must be a positive integer or 'grid', got {dw_mesh!r}")
        if dw_mesh == "grid" and grid is None:
            raise ValueError("dw_mesh='grid' takes the Debye–Waller factor of a grid: give grid=(L1, L2, L3)")
        self.dw_mesh = dw_mesh
        self.grid = None if grid is None else check_grid(grid)

    def mean_square_displacement(self) -> torch.Tensor:
        """C_{κ0,κ0} (n, 3, 3) Å², converged in the Brillouin-zone mesh (`dw_mesh`), or of `grid`'s mesh.

        Returns:
            C_{κ0,κ0}, (n, 3, 3) Å².

        Raises:
            UnstableError: D(q) is not positive definite at some q of the mesh.
        """
        if self.dw_mesh == "grid":
            return self._at_fixed_theta("msd", lambda: (self.covariance.mean_square_displacement(self.grid),))[0]
        mesh = int(self.dw_mesh)
        return self._at_fixed_theta("msd", lambda: (self.covariance.converged_mean_square_displacement(mesh),))[0]

    def debye_waller(self) -> DebyeWaller:
        """The crystal's Debye–Waller factor (`mean_square_displacement`)."""
        return DebyeWaller(self.mean_square_displacement())

    def forward(self, q, levels=None) -> torch.Tensor:
        q = self.as_q(q)
        amplitude = self.amplitude(q, self.debye_waller())  # here: form factors may call xraydb
        return torch.cat(map_chunks(lambda qc, amp: one_phonon_intensity(self.covariance, qc, amp),
                                    (q, amplitude), self._chunk or matrix_chunk(self.force_constants.n_atoms)))

    def options(self) -> dict:
        return {**super().options(), "dw_mesh": self.dw_mesh, "grid": self.grid}

    def settings(self) -> dict:
        own = {"dw_mesh": self.dw_mesh}
        if self.dw_mesh == "grid":
            own["grid"] = list(self.grid)
        return {**super().settings(), **own}

    @classmethod
    def settings_options(cls, force_constants, settings: dict) -> dict:
        return {key: settings[key] for key in ("dw_mesh", "grid") if settings.get(key) is not None}
