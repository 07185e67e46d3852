"""TDSModel: diffuse intensity I(Q) in e.u. per atom from a ForceConstantModel (DESIGN §3).

One interface, three methods:
- "one-phonon": I₁(Q), per-Q Cholesky solves (classical) or a degeneracy-safe matrix function (quantum);
- "gaussian":  all orders, exact for a harmonic crystal: I₁ in q-space + the higher orders from the
  real-space covariance on a periodic grid of primitive cells (`grid`);
- "sampling":  the published Monte-Carlo route, see `ase_tds.sampling`.
Debye–Waller factors come from a Brillouin-zone mesh extrapolated to convergence (`dw_mesh`), or from
the grid itself with dw_mesh="grid" (the exact finite periodic supercell).
"""

from __future__ import annotations

import numpy as np
import torch

from .covariance import (
    check_statistics,
    check_temperature,
    converged_mean_square_displacement,
    mean_square_displacement,
    real_space_covariance,
)
from .chunks import map_chunks, matrix_chunk
from .scattering import FormFactors, debye_waller_exponent, multi_phonon_intensity, one_phonon_intensity

METHODS = ("one-phonon", "gaussian", "sampling")


class TDSModel(torch.nn.Module):
    """I(Q) (B,) e.u./atom at Cartesian Q (B, 3) Å⁻¹; differentiable in the force constants' θ.

    force_constants: ForceConstantModel (its θ is this module's only parameter).
    temperature: K. method: "one-phonon" | "gaussian" | "sampling". statistics: "classical" | "quantum".
    form_factors: "xraydb" or {symbol: constant or f(|Q|)}. dw_mesh: int m (meshes m³ and (2m)³,
    Richardson-extrapolated) or "grid". grid: (L1, L2, L3) primitive cells for the gaussian higher orders.
    sampler: an `ase_tds.sampling` sampler, for method="sampling". chunk: Q per block; by default about
    2¹⁹ dynamical-matrix entries (cache-sized for large cells) and 2²² higher-order terms per block.
    """

    def __init__(self, force_constants, temperature: float, method: str = "gaussian",
                 statistics: str = "quantum", form_factors="xraydb", dw_mesh=12, grid=(15, 15, 15),
                 sampler=None, chunk: int | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_statistics(statistics)
        check_temperature(temperature, statistics)
        if method == "sampling" and sampler is None:
            raise ValueError("method='sampling' needs a sampler (ase_tds.sampling.DenseSampler or QSpaceSampler)")
        self.force_constants = force_constants
        self.temperature = float(temperature)
        self.method = method
        self.statistics = statistics
        self.form_factors = FormFactors(force_constants.primitive.get_chemical_symbols(), form_factors)
        self.dw_mesh = dw_mesh
        self.grid = tuple(int(x) for x in grid)
        self.sampler = sampler
        n = force_constants.n_atoms
        terms = np.prod(self.grid) * n * n if method == "gaussian" else 1
        self.chunk = int(chunk) if chunk else int(min(matrix_chunk(n), max(2**22 // terms, 16)))
        self._cache = {}

    def _at_fixed_theta(self, name: str, compute):
        """compute() once per θ where no gradient is wanted (repeated evaluations at fixed force
        constants); recomputed in the graph whenever θ needs a gradient."""
        theta = self.force_constants.theta
        if torch.is_grad_enabled() and theta.requires_grad:
            return compute()
        key, value = self._cache.get(name, (None, None))
        if key is None or key.device != theta.device or not torch.equal(key, theta):
            key, value = theta.detach().clone(), compute()
            self._cache[name] = (key, value)
        return value

    def mean_square_displacement(self) -> torch.Tensor:
        """C_{κ0,κ0} (n, 3, 3) Å² used in the Debye–Waller factors."""
        fc, t, s = self.force_constants, self.temperature, self.statistics
        if self.dw_mesh == "grid":
            return self._at_fixed_theta("msd", lambda: mean_square_displacement(fc, t, s, self.grid))
        return self._at_fixed_theta("msd", lambda: converged_mean_square_displacement(fc, t, s, int(self.dw_mesh)))

    def correlation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(separations (G, n, n, 3) Å, C_{κ0,κ'l} (G, n, n, 3, 3) Å²) on `grid`, for the higher orders."""
        fc, t, s = self.force_constants, self.temperature, self.statistics
        return self._at_fixed_theta("correlation", lambda: real_space_covariance(fc, t, s, self.grid))

    def amplitude(self, q: torch.Tensor, msd: torch.Tensor) -> torch.Tensor:
        """A_κ(Q) = f_κ(|Q|) e^{−W_κ(Q)}, (B, n) e.u., for q (B, 3) Å⁻¹ and msd (n, 3, 3) Å²."""
        return self.form_factors(torch.linalg.norm(q, dim=-1)) * torch.exp(-debye_waller_exponent(q, msd))

    def forward(self, q) -> torch.Tensor:
        """I(Q) (B,) in e.u./atom at Cartesian q (B, 3) Å⁻¹ (array or tensor; reshaped to (-1, 3))."""
        fc = self.force_constants
        q = torch.as_tensor(q, dtype=fc.theta.dtype, device=fc.theta.device).reshape(-1, 3)
        if self.method == "sampling":
            return self.sampler.intensity(self, q)[0]
        msd = self.mean_square_displacement()
        correlation = self.correlation() if self.method == "gaussian" else None
        amplitude = self.amplitude(q, msd)  # here, not in the workers: form factors may call xraydb

        def intensity(qc, amp):
            value = one_phonon_intensity(fc, qc, amp, self.temperature, self.statistics)
            return value if correlation is None else value + multi_phonon_intensity(qc, amp, *correlation)

        return torch.cat(map_chunks(intensity, (q, amplitude), self.chunk))

    def intensity_hkl(self, hkl, cell=None) -> torch.Tensor:
        """I (N,) e.u./atom at hkl (N, 3) in r.l.u. of `cell` (3, 3) Å (default: the force constants' unit cell)."""
        return self(self.force_constants.q_from_hkl(np.asarray(hkl, dtype=float), cell))
