"""X-ray form factors, Debye–Waller exponents and the intensity kernels of DESIGN §2.

Intensities are kinematic, per atom of the crystal, in electron units (e.u.), diffuse part only.
Shapes: B scattering vectors, n atoms in the primitive cell, G lattice vectors of a real-space grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import xraydb

from .covariance import (
    KB,
    InverseForm,
    covariance_from_routes,
    quantum_series_form,
    thermal_routes,
)


class FormFactors:
    """f_κ(|Q|) for the atoms of a cell: (B,) Å⁻¹ → (B, n) e.u.

    `source`: "xraydb" (Waasmaier–Kirfel f₀ of the neutral atoms, argument sinθ/λ = |Q|/4π), or a
    mapping {symbol: constant or callable(|Q| ndarray Å⁻¹) → ndarray}; symbols missing from the
    mapping fall back to xraydb.
    """

    def __init__(self, symbols, source: str | Mapping = "xraydb"):
        if not (source == "xraydb" or isinstance(source, Mapping)):
            raise ValueError("form factors: give 'xraydb' or a {symbol: constant or f(|Q|)} mapping")
        table = {} if source == "xraydb" else dict(source)
        unknown = sorted(set(table) - set(symbols))
        if unknown:
            raise ValueError(f"form factors given for {unknown}, which are not in the crystal ({sorted(set(symbols))})")
        self.symbols = list(symbols)
        self._per_symbol: dict[str, Callable] = {}
        for symbol in set(symbols):
            value = table.get(symbol)
            if value is None:
                self._per_symbol[symbol] = lambda q, s=symbol: np.asarray(xraydb.f0(s, q / (4 * np.pi)), dtype=float)
            elif callable(value):
                self._per_symbol[symbol] = value
            else:
                self._per_symbol[symbol] = lambda q, c=float(value): np.full_like(q, c)

    def __call__(self, q_norm: torch.Tensor) -> torch.Tensor:
        q = q_norm.detach().cpu().numpy()
        values = {s: np.broadcast_to(f(q), q.shape) for s, f in self._per_symbol.items()}
        table = np.stack([values[s] for s in self.symbols], axis=-1)
        return torch.as_tensor(table, dtype=q_norm.dtype, device=q_norm.device)


def debye_waller_exponent(q: torch.Tensor, msd: torch.Tensor) -> torch.Tensor:
    """W_κ(Q) = ½ Q·C_{κ0,κ0}·Q, (B, n), for q (B, 3) Å⁻¹ and msd (n, 3, 3) Å²."""
    return 0.5 * torch.einsum("ba,kac,bc->bk", q, msd, q)


def one_phonon_intensity(model, q: torch.Tensor, amplitude: torch.Tensor, temperature: float,
                         statistics: str) -> torch.Tensor:
    """I₁(Q) = (1/n) Σ_κκ' A_κ A_κ' Q·C̃_κκ'(Q)·Q, (B,) e.u., with A_κ = f_κ e^{−W_κ} (B, n).

    C̃ at the unreduced Q. Classical: k_BT ‖L⁻¹v‖² with D = LL† (one triangular solve per Q). Quantum:
    the same plus the series of `quantum_series` (matrix–vector products), or where it does not
    converge (low T) the full matrix function.
    """
    n = amplitude.shape[-1]
    inv_sqrt_m = 1.0 / torch.sqrt(model.masses)
    v = ((amplitude * inv_sqrt_m)[:, :, None] * q[:, None, :]).reshape(len(q), 3 * n)
    routes = thermal_routes(model, q, temperature, statistics)
    dyn, proj, c, plain, series = routes
    if statistics == "quantum" and series is None:
        cov = covariance_from_routes(routes, temperature, statistics)
        vc = v.to(cov.dtype)
        return torch.einsum("bi,bij,bj->b", vc.conj(), cov, vc).real / n
    value = KB * temperature * InverseForm.apply(dyn, v, "Q")
    if proj is not None:  # the lifted translations: subtract k_BT/c · v†Pv
        vc = v.to(proj.dtype)
        value = value - KB * temperature / c * torch.einsum("bi,bij,bj->b", vc.conj(), proj, vc).real
    if series is not None:
        value = value + quantum_series_form(plain, v, series, proj)
    return value / n


def multi_phonon_intensity(q: torch.Tensor, amplitude: torch.Tensor, separations: torch.Tensor,
                           correlation: torch.Tensor) -> torch.Tensor:
    """Σ orders ≥ 2: (1/n) Σ_κκ' A_κ A_κ' Σ_l cos(Q·d) [e^X − 1 − X], X = Q·C_{κ0,κ'l}·Q; (B,) e.u.

    separations (G, n, n, 3) Å: d = r_κ'l − r_κ0; correlation (G, n, n, 3, 3) Å²: C_{κ0,κ'l}.
    """
    n = amplitude.shape[-1]
    qq = (q[:, :, None] * q[:, None, :]).reshape(len(q), 9)
    x = qq @ correlation.reshape(-1, 9).T  # (B, G·n·n)
    phase = torch.cos(q @ separations.reshape(-1, 3).T)
    terms = (phase * (torch.expm1(x) - x)).reshape(len(q), -1, n, n).sum(1)
    return torch.einsum("bk,bkl,bl->b", amplitude, terms, amplitude) / n
