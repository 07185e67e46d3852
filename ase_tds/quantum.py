"""Quantum statistics of the displacement covariance: h(λ) = ħ coth(ħω/2k_BT)/2ω as a function of λ = ω² of D(q),
by its power series where it converges (matrix products only) and otherwise as a Hermitian matrix function with the
Daleckii–Krein backward (`HermitianFunction`); used by `ThermalCovariance` (docs/theory.md)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import zeta
from torch.autograd.function import once_differentiable

from .linalg import UnstableError
from .units import HBAR_OMEGA_UNIT, KB

def thermal_energy(omega2: torch.Tensor, temperature: float) -> torch.Tensor:
    """(ħω/2)·coth(ħω/2k_BT) in eV for ω² in eV/Å²/amu: k_BT classically, ħω/2 at T = 0.

    Args:
        omega2: ω² (any shape), eV/Å²/amu.
        temperature: K; 0 gives the zero-point energy ħω/2.

    Returns:
        (ħω/2)·coth(ħω/2k_BT), eV, the shape of `omega2`.
    """
    half = 0.5 * HBAR_OMEGA_UNIT * torch.sqrt(omega2)
    if temperature == 0:
        return half
    x = half / (KB * temperature)
    # x·coth(x) with a series where it would lose digits
    small = x < 1e-3
    xs = torch.where(small, torch.ones_like(x), x)
    return KB * temperature * torch.where(small, 1 + x**2 / 3, xs / torch.tanh(xs))


SERIES_MAX_RATIO = 0.5625  # (x/π)² ≤ (3/4)²: at most ~60 terms
SERIES_TOLERANCE = 1e-16  # relative truncation error of x·coth x


def quantum_series(model, temperature: float) -> np.ndarray | None:
    """b_k (K,) with h(λ) = k_BT/λ + Σ_{k=1..K} b_k λ^{k−1} on the spectrum of the model's D(q), or None.

    x·coth x = 1 + Σ_k (−1)^{k+1} 2ζ(2k) (x/π)^{2k}, x² = sλ, s = (ħ/2k_BT)² in the units of λ (eV/Å²/amu);
    it converges for x < π. Used when the model's bound on every eigenvalue at every q
    (`eigenvalue_bound`) gives (x/π)² ≤ SERIES_MAX_RATIO, truncated at SERIES_TOLERANCE relative;
    None (use the eigen-decomposition) otherwise, and at T = 0.

    Args:
        model (ForceConstantSource): the force constants; their `eigenvalue_bound()` (eV/Å²/amu) bounds λ.
        temperature: K.

    Returns:
        The coefficients b_k (K,), for h in Å²·amu and λ in eV/Å²/amu; None where the series is not used
            (it would not converge fast enough, or T = 0).
    """
    if temperature == 0:
        return None
    s = (0.5 * HBAR_OMEGA_UNIT / (KB * temperature)) ** 2
    ratio = s * model.eigenvalue_bound() / np.pi ** 2
    if ratio > SERIES_MAX_RATIO:
        return None
    terms = 2
    while 2 * ratio ** (terms + 1) / (1 - ratio) > SERIES_TOLERANCE:
        terms += 1
    k = np.arange(1, terms + 1)
    return KB * temperature * (-1.0) ** (k + 1) * 2 * zeta(2 * k) * (s / np.pi ** 2) ** k


def quantum_series_matrix(dyn: torch.Tensor, coefficients: np.ndarray, proj) -> torch.Tensor:
    """h(D) − k_BT·D⁻¹ off the translations: b_1(1 − P) + Σ_{k≥2} b_k D^{k−1}, (B, m, m).

    The polynomial by Paterson–Stockmeyer: about 2√K matrix products instead of K.

    Args:
        dyn: the unlifted D (B, m, m) complex, eV/Å²/amu.
        coefficients: b_k (K,) of `quantum_series`.
        proj (torch.Tensor | None): the translation projector P (B, m, m), or None where no q is a Γ point
            (D^{k−1}, k ≥ 2, annihilates the translations by itself).

    Returns:
        h(D) − k_BT·D⁻¹ off the translations, (B, m, m) complex, Å²·amu.
    """
    eye = torch.eye(dyn.shape[-1], dtype=dyn.dtype, device=dyn.device)
    first = coefficients[0] * (eye if proj is None else eye - proj)
    return (first + matrix_polynomial(dyn, coefficients[1:])) if len(coefficients) > 1 else first


def matrix_polynomial(dyn: torch.Tensor, coefficients) -> torch.Tensor:
    """Σ_{k=1..K} a_k D^k (B, m, m) for a = `coefficients` (K,), by Paterson–Stockmeyer.

    With s = ⌈√K⌉: D², …, D^s, then Horner in D^s over blocks Σ_{i=1..s} a_{js+i} D^i.

    Args:
        dyn: D (B, m, m).
        coefficients (Sequence[float] | np.ndarray): a_1, …, a_K (K,), K ≥ 1.

    Returns:
        Σ_{k=1..K} a_k D^k, (B, m, m), dtype of `dyn`.
    """
    s = max(1, int(np.ceil(np.sqrt(len(coefficients)))))
    powers = [dyn]
    while len(powers) < min(s, len(coefficients)):
        powers.append(powers[-1] @ dyn)
    blocks = [sum(a * power for a, power in zip(coefficients[j:j + s], powers))
              for j in range(0, len(coefficients), s)]
    acc = blocks[-1]
    for block in blocks[-2::-1]:
        acc = block + powers[-1] @ acc
    return acc


def quantum_series_form(dyn: torch.Tensor, v: torch.Tensor, coefficients: np.ndarray, proj) -> torch.Tensor:
    """v†(h(D) − k_BT·D⁻¹)v off the translations, (B,) real, for v (B, m).

    The moments μ_k = v†D^k v from w_j = D^j v: μ_2j = w_j†w_j and μ_2j+1 = w_j†w_j+1 (D Hermitian),
    so K terms take ⌈(K−1)/2⌉ matrix–vector products.

    Args:
        dyn: the unlifted D (B, m, m) complex, eV/Å²/amu.
        v: (B, m), real or complex.
        coefficients: b_k (K,) of `quantum_series`.
        proj (torch.Tensor | None): the translation projector P (B, m, m), or None where no q is a Γ point.

    Returns:
        v†(h(D) − k_BT·D⁻¹)v off the translations, (B,) real, Å²·amu·|v|².
    """
    vc = v.to(dyn.dtype)
    norm2 = (vc.abs() ** 2).sum(-1)
    if proj is not None:
        norm2 = norm2 - torch.einsum("bi,bij,bj->b", vc.conj(), proj, vc).real
    total = coefficients[0] * norm2
    w = [vc]
    for k, b in enumerate(coefficients[1:], start=1):
        j = k // 2
        if len(w) <= j + k % 2:
            w.append((dyn @ w[-1][..., None])[..., 0])
        total = total + b * (w[j].conj() * w[j + k % 2]).sum(-1).real
    return total


def _quantum_h(temperature: float):
    """h(λ) = ε(λ)/λ and its derivative, for the Daleckii–Krein matrix function."""

    def h(lam):
        lam_req = lam.detach().requires_grad_(True)
        with torch.enable_grad():
            value = thermal_energy(lam_req, temperature) / lam_req
            (deriv,) = torch.autograd.grad(value.sum(), lam_req)
        return value.detach(), deriv

    return h


class HermitianFunction(torch.autograd.Function):
    """f(A) = V f(Λ) V† for Hermitian A (..., m, m), with the Daleckii–Krein backward.

    `func(λ) -> (f(λ), f'(λ))`. Divided differences (f(λi) − f(λj))/(λi − λj), replaced by the mean
    derivative where eigenvalues are degenerate to 1e-8 relative: exact gradients at degeneracies.
    """

    @staticmethod
    def forward(ctx, matrix, func):
        """f(A) = V f(Λ) V† by torch.linalg.eigh; saves Λ, V, f(Λ) and f'(Λ) for the backward.

        Args:
            ctx (torch.autograd.function.FunctionCtx): the autograd context.
            matrix (torch.Tensor): A (..., m, m), Hermitian positive definite.
            func (Callable): λ (..., m) → (f(λ), f'(λ)), two real tensors of the shape of λ.

        Returns:
            (torch.Tensor): f(A) (..., m, m).

        Raises:
            UnstableError: an eigenvalue ≤ 0 (imaginary or zero modes).
        """
        lam, vec = torch.linalg.eigh(matrix)
        if torch.any(lam <= 0):
            raise UnstableError("dynamical matrix not positive definite (imaginary or zero modes)")
        f, fprime = func(lam)
        ctx.save_for_backward(lam, vec, f, fprime)
        return (vec * f.to(vec.dtype)[..., None, :]) @ vec.mH

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        """The Daleckii–Krein backward: V (V†GV ∘ K) V†, K the divided differences of f.

        Args:
            ctx (torch.autograd.function.FunctionCtx): the autograd context of `forward`.
            grad (torch.Tensor): G, the gradient with respect to f(A), (..., m, m).

        Returns:
            (tuple[torch.Tensor, None]): the gradient with respect to A (..., m, m), and None for `func`.
        """
        lam, vec, f, fprime = ctx.saved_tensors
        dlam = lam[..., :, None] - lam[..., None, :]
        scale = lam.abs().amax(dim=-1, keepdim=True)[..., None]
        close = dlam.abs() <= 1e-8 * scale
        divided = (f[..., :, None] - f[..., None, :]) / torch.where(close, torch.ones_like(dlam), dlam)
        kernel = torch.where(close, 0.5 * (fprime[..., :, None] + fprime[..., None, :]), divided)
        inner = vec.mH @ grad @ vec
        return vec @ (inner * kernel.to(inner.dtype)) @ vec.mH, None
