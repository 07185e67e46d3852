"""What the data determine: parameter combinations and their 1σ, and the 1σ of phonon frequencies.

The Gauss–Newton matrix of θ (eV/Å²), profiled over the scale and background, is diagonalised,
JᵀWJ = Σ_k λ_k v_k v_kᵀ: each v_k is a combination of force constants and σ_k = 1/√λ_k its 1σ. A combination whose σ_k exceeds UNDETERMINED × max|θ| is one the data
do not determine: the fit names it, in parameter labels, so that no one reads a value off it.
Frequencies: σ_ν(q)² = J Σ Jᵀ with J = ∂ν/∂θ by central differences (first order in the errors of θ).
"""

from __future__ import annotations

import copy

import numpy as np

UNDETERMINED = 0.05  # a combination with 1σ above this fraction of the largest |θ| is not determined by the data
SHOWN_WEIGHT = 0.2  # labels with |weight| ≥ this are named in a combination's text


def parameter_combinations(labels, theta, precision) -> list[dict]:
    """The eigen-combinations of the Gauss–Newton matrix of θ, least determined first.

    The eigenvalue λ_k of the precision gives a combination's 1σ = 1/√λ_k (infinite where λ_k ≤ 0); it is
    determined when 1σ ≤ UNDETERMINED (0.05) × max|θ|.

    Args:
        labels (Sequence[str]): (n,) parameter labels, e.g. `model.labels`.
        theta (array_like): θ (n,) eV/Å².
        precision (array_like): (n, n) (eV/Å²)⁻²: JᵀWJ profiled over the nuisance values.

    Returns:
        One dict per combination, least determined first: {"sigma": 1σ (eV/Å²), "relative": 1σ / max|θ|,
            "determined": bool, "weights": {label: weight} (a unit vector, its largest weight positive),
            "text": e.g. "+0.71·2XX -0.70·2ZZ", the labels of weight ≥ 0.2}.
    """
    precision = np.asarray(precision, dtype=float)
    eigenvalues, vectors = np.linalg.eigh((precision + precision.T) / 2)  # ascending: least determined first
    size = max(float(np.abs(theta).max()), 1e-12)
    out = []
    for k in range(len(eigenvalues)):
        v = vectors[:, k] * np.sign(vectors[np.argmax(np.abs(vectors[:, k])), k])
        sigma = float(1 / np.sqrt(eigenvalues[k])) if eigenvalues[k] > 0 else float("inf")
        shown = [i for i in np.argsort(-np.abs(v)) if abs(v[i]) >= SHOWN_WEIGHT]
        text = " ".join(f"{v[i]:+.2f}·{labels[i]}" for i in shown)
        out.append({"sigma": sigma, "relative": sigma / size, "determined": sigma <= UNDETERMINED * size,
                    "weights": {labels[i]: float(v[i]) for i in range(len(labels))},
                    "text": text})
    return out


def frequency_sigma(model, q, covariance, step: float = 1e-4) -> np.ndarray:
    """1σ (B, 3n) THz of the frequencies at Cartesian q (B, 3) Å⁻¹ from θ's covariance (n, n) (eV/Å²)².

    ∂ν/∂θ by central differences of the sorted frequencies (steps `step`·max(|θ_k|, 0.01) eV/Å²) on a copy of
    `model` (a ForceConstantModel); at a degeneracy the sorted branches are continuous, so this stays finite.

    Args:
        model (ForceConstantModel): ForceConstantModel at the fitted θ (not changed: a copy is used).
        q (array_like): Cartesian q (B, 3) Å⁻¹.
        covariance (array_like): θ's covariance (n, n) (eV/Å²)².
        step: relative finite-difference step of each θ_k.

    Returns:
        σ_ν (B, 3n) THz, the 1σ of each sorted branch at each q.
    """
    work = copy.deepcopy(model)
    theta = work.theta.detach().cpu().numpy().copy()
    columns = []
    for k in range(len(theta)):
        h = step * max(abs(theta[k]), 1e-2)
        shifted = theta.copy()
        shifted[k] += h
        plus = work.set_parameters(shifted).frequencies(q)
        shifted[k] -= 2 * h
        minus = work.set_parameters(shifted).frequencies(q)
        columns.append((plus - minus) / (2 * h))
    jac = np.stack(columns, axis=-1)  # (B, 3n, n)
    return np.sqrt(np.clip(np.einsum("bmi,ij,bmj->bm", jac, np.asarray(covariance, dtype=float), jac), 0, None))
