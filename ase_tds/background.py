"""Nuisance terms of a TDS fit: scale, constant background and a Compton-shaped background.

Model of the measured intensity (N,) at the used points:  m(Q) = s · I(Q; θ) + b + A · c(|Q|)
- s: global scale (free, or fixed to 1 for absolute data, e.u./atom);
- b: constant background (free or none), in data units;
- A: amplitude of the incoherent (Compton) scattering c(|Q|) (free or none), in data units: with absolute data
  A = 1 is the whole incoherent scattering of a free-atom crystal.
All three enter linearly, so at every θ they are eliminated (variable projection): in closed form for χ², by a
few Newton steps for the Poisson deviance. By the envelope theorem the gradient of the profiled loss in θ is the
partial gradient at the optimal (s, b, A), so the θ optimiser sees a loss of θ alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import xraydb
from scipy.interpolate import PchipInterpolator

from . import _compton_table
from .units import RECOIL_KEV_A2

NAMES = ("scale", "background", "compton")


class ComptonShape:
    """c(|Q|) (N,) in e.u. per atom: the mean over the cell's atoms of the incoherent scattering function S_κ.

    ComptonShape(symbols)(q_norm) with q_norm (N,) Å⁻¹. S_κ(x), x = |Q|/4π Å⁻¹, is Hubbell et al. (1975)'s
    tabulation (Waller–Hartree theory with Hartree–Fock wavefunctions; see `ase_tds._compton_table`),
    interpolated monotonically. Why this shape: it is the standard table (International Tables C, 7.4.3),
    rises from 0 at Q = 0 to Z at large Q as the electrons' incoherent scattering does; xraydb (our source of
    f₀) has no S(Q), and the simple closed form Z − f₀²/Z is no substitute: for Ni its ratio to Hubbell's S
    drifts from 0.79 at 0.5 Å⁻¹ to 0.54 at 3 Å⁻¹ and 0.64 at 8 Å⁻¹, too much for a one-amplitude fit.
    With `energy_kev`, c is multiplied by the Breit–Dirac recoil factor (E'/E)²,
    E'/E = 1/(1 + 0.00381 |Q|²/E) (E in keV, |Q| in Å⁻¹), a photon-counting detector taking in the whole Compton
    line (at 8 Å⁻¹ the factor is 0.976 at 20 keV, 0.994 at 80 keV: smooth, a few %).
    An analyser's energy window is not modelled. Calling it with |Q| beyond the table (4π·x_max Å⁻¹) raises
    ValueError.

    Args:
        symbols (Sequence[str]): chemical symbols of the cell's atoms (e.g. `atoms.get_chemical_symbols()`), Z = 1 to
            the table's end; the mean is over this list.
        energy_kev: the incident photon energy, keV (> 0); None leaves the recoil factor out.

    Raises:
        ValueError: energy_kev ≤ 0, or an element the table does not cover.
    """

    def __init__(self, symbols, energy_kev: float | None = None):
        if energy_kev is not None and not energy_kev > 0:
            raise ValueError(f"energy_kev must be a positive photon energy in keV, got {energy_kev!r}")
        self.energy_kev = energy_kev
        self.symbols = list(symbols)
        self._per_symbol = {}
        for symbol in set(self.symbols):
            z = xraydb.atomic_number(symbol)
            if not 1 <= z <= len(_compton_table.S):
                raise ValueError(f"no incoherent scattering function for {symbol} (Z = {z}); the table covers "
                                 f"Z = 1–{len(_compton_table.S)}: give compton=callable(|Q| Å⁻¹) → e.u. per atom")
            self._per_symbol[symbol] = PchipInterpolator(_compton_table.X, _compton_table.S[z - 1], extrapolate=False)
        self.x_max = float(_compton_table.X[-1])

    def __call__(self, q_norm) -> np.ndarray:
        x = np.asarray(q_norm, dtype=float) / (4 * np.pi)
        if np.any(x > self.x_max) or np.any(x < 0):
            raise ValueError(f"the incoherent scattering table covers 0 ≤ |Q| ≤ {4 * np.pi * self.x_max:.0f} Å⁻¹; "
                             "give compton=callable(|Q| Å⁻¹) → e.u. per atom for larger |Q|")
        value = np.mean([self._per_symbol[s](x) for s in self.symbols], axis=0)
        if self.energy_kev is not None:  # E'/E = 1/(1 + (E/mc²)(1 − cos 2θ)), 1 − cos 2θ = 2(|Q|hc/4πE)²
            value = value / (1 + RECOIL_KEV_A2 * np.asarray(q_norm, dtype=float) ** 2 / self.energy_kev) ** 2
        return value


class Nuisance:
    """The linear nuisance model m = s·I + b + A·c of one data set (N used points), and its elimination.

    `names`: the free parameters in the order of β (a subset of "scale", "background", "compton").

    Args:
        scale: "free" | "fixed" (s = 1, absolute data).
        background: "free" (a constant b, data units) | "none".
        compton (bool | Callable): False | True (ComptonShape of `symbols`) | callable(|Q| ndarray Å⁻¹) → (N,) in e.u.
            per atom.
        q_norm (array_like): |Q| (N,) Å⁻¹ of the used points.
        symbols (Sequence[str]): chemical symbols of the cell's atoms, for compton=True.
        dtype (torch.dtype): torch dtype of the Compton shape.
        device (str | torch.device): torch device of the Compton shape.

    Raises:
        ValueError: an unknown scale, background or compton, or a Compton shape that is not finite (N,).
    """

    def __init__(self, scale: str, background: str, compton, q_norm, symbols, dtype=torch.float64, device="cpu"):
        if scale not in ("free", "fixed"):
            raise ValueError(f"scale must be 'free' or 'fixed', got {scale!r}")
        if background not in ("free", "none"):
            raise ValueError(f"background must be 'free' (a constant) or 'none', got {background!r}; "
                             "for a Compton-shaped background add compton=True")
        if not (isinstance(compton, bool) or callable(compton)):
            raise ValueError(f"compton must be False, True or a callable(|Q| Å⁻¹) → e.u. per atom, got {compton!r}")
        self.scale_mode, self.background_mode = scale, background
        self.shape = None
        if compton is not False:
            func: Callable = ComptonShape(symbols) if compton is True else compton
            values = np.asarray(func(np.asarray(q_norm, dtype=float)), dtype=float)
            if values.shape != np.shape(q_norm) or not np.all(np.isfinite(values)):
                raise ValueError(f"the Compton shape must give finite values of shape {np.shape(q_norm)}, "
                                 f"got shape {values.shape}")
            self.shape = torch.as_tensor(values, dtype=dtype, device=device)
        self.names = [n for n, on in zip(NAMES, (scale == "free", background == "free", self.shape is not None)) if on]

    @property
    def n_free(self) -> int:
        """Number k of free nuisance parameters (the length of β)."""
        return len(self.names)

    def design(self, intensity: torch.Tensor, pick=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(fixed part (B,), columns (B, k)) with m = fixed + columns·β, for the intensities (B,) of the points
        `pick` (a slice or indices of the N points; default all).

        Args:
            intensity: model I(Q; θ) (B,) e.u./atom at the picked points.
            pick (slice | array_like): slice or indices (B,) of the N used points; default all.

        Returns:
            fixed (B,) (I for a fixed scale, else 0) and the design columns (B, k) in the order of `names`.
        """
        ones = torch.ones_like(intensity)
        columns = {"scale": intensity, "background": ones, "compton": None if self.shape is None else self.shape[pick]}
        fixed = intensity if self.scale_mode == "fixed" else torch.zeros_like(intensity)
        x = torch.stack([columns[n] for n in self.names], dim=1) if self.names else intensity[:, None][:, :0]
        return fixed, x

    def model(self, intensity: torch.Tensor, beta: torch.Tensor, pick=slice(None)) -> torch.Tensor:
        """The modelled measurement m = s·I + b + A·c at the picked points.

        Args:
            intensity: model I(Q; θ) (B,) e.u./atom at the picked points.
            beta: the free nuisance values (k,), in the order of `names`.
            pick (slice | array_like): slice or indices (B,) of the N used points; default all.

        Returns:
            m (B,) in data units.
        """
        fixed, x = self.design(intensity, pick)
        return fixed + x @ beta

    def values(self, beta) -> dict:
        """{"scale", "background", "compton"}: the fitted or fixed values (compton None when not fitted).

        Args:
            beta (torch.Tensor | array_like): the free nuisance values (k,) (tensor or array), in the order of `names`.

        Returns:
            dict of floats: scale (1.0 when fixed), background (data units; 0.0 when none), compton (or None).
        """
        out = {"scale": 1.0, "background": 0.0, "compton": None}
        out.update({n: float(v) for n, v in zip(self.names, np.asarray(torch.as_tensor(beta).detach().cpu()))})
        return out

    @torch.no_grad()
    def poisson(self, intensity: torch.Tensor, counts: torch.Tensor, exposure: torch.Tensor,
                start: torch.Tensor | None = None, max_steps: int = 50) -> torch.Tensor:
        """β (k,) minimising the Poisson deviance of counts (N,) with means exposure·m (Newton, step halving).

        Feasible start (m > 0 at every point): `start` if feasible, else s = Σn/Σt·I with b = A = 0.

        Args:
            intensity: model I(Q; θ) (N,) e.u./atom at the used points.
            counts: measured counts n (N,) ≥ 0.
            exposure: t (N,), counts per data unit at each point: the mean count is t·m.
            start: β (k,) to start from; None or infeasible = the start above.
            max_steps: most Newton steps.

        Returns:
            β (k,), in the order of `names`; empty when nothing is free.
        """
        fixed, x = self.design(intensity.detach())
        if not self.names:
            return x.new_zeros(0)
        beta = start if start is not None else x.new_zeros(self.n_free)
        if start is None or not torch.all(fixed + x @ beta > 0):
            beta = x.new_zeros(self.n_free)
            if self.scale_mode == "free":
                beta[0] = counts.sum() / (exposure * intensity).sum()
        value = _poisson_deviance(counts, exposure * (fixed + x @ beta))

        def newton(beta):
            """(step, decrement) of Newton's method at β."""
            m = fixed + x @ beta
            grad = 2 * x.T @ (exposure - counts / m)
            hess = 2 * (x * (counts / m**2)[:, None]).T @ x
            hess = hess + 1e-12 * torch.diagonal(hess).abs().max().clamp(min=1e-300) * torch.eye(len(beta), dtype=x.dtype)
            step = torch.linalg.solve(hess, grad)
            return step, float(grad @ step)

        for _ in range(max_steps):
            step, decrement = newton(beta)
            if decrement < 1e-8 * max(abs(float(value)), 1.0):
                # Newton's quadratic region: full steps, unguarded (here the deviance changes by less than its own
                # rounding, so the line search would stop short at random and leave β off by ~1e-10)
                for _ in range(3):
                    trial = beta - step
                    if not torch.all(fixed + x @ trial > 0):
                        break
                    beta = trial
                    step, decrement = newton(beta)
                break
            t = 1.0
            while t > 1e-10:
                trial = beta - t * step
                m_trial = fixed + x @ trial
                if torch.all(m_trial > 0):
                    new = _poisson_deviance(counts, exposure * m_trial)
                    if new <= value + 1e-14 * abs(value):
                        break
                t *= 0.5
            else:
                break
            beta, value = trial, new
        return beta


def _poisson_deviance(counts: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """2 Σ [n log(n/μ) − (n − μ)] for counts n ≥ 0 and means μ > 0 (N,); the n = 0 terms are 2μ."""
    return 2 * (torch.xlogy(counts, counts) - torch.xlogy(counts, mean) - counts + mean).sum()


def poisson_deviance(counts: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The Poisson deviance (a scalar tensor) of counts (N,) ≥ 0 given means (N,) > 0, differentiable in mean.

    2 Σ [n log(n/μ) − (n − μ)]; the n = 0 terms are 2μ.

    Args:
        counts: n (N,) ≥ 0.
        mean: μ (N,) > 0.

    Returns:
        The deviance, a 0-d tensor (dimensionless).
    """
    return _poisson_deviance(counts, mean)
