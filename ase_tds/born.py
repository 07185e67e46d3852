"""Born effective charges and ε∞ as fit parameters: a symmetry-adapted basis (docs/theory.md, "Polar crystals").

Z*_κ (n, 3, 3) e transforms as Z*_{g(κ)} = R_g Z*_κ R_gᵀ under every operation g of the space group (R_g its
Cartesian rotation, g(κ) the atom it maps κ to), and the charges of a neutral crystal sum to zero (the acoustic sum
rule of the charges, Σ_κ Z*_κ = 0). ε∞ (3, 3) is symmetric and invariant, R_g ε∞ R_gᵀ = ε∞. Both constraints are
linear: the parameters are the coefficients of a basis of the tensors that satisfy them, each basis tensor scaled
to 1 at one entry that names it ("Z*(Na)xx", "ε∞zz"), so a parameter is the value of that entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import spglib
import torch
from ase import Atoms

from .covariance import UnstableError

AXES = "xyz"


def unit_of(label: str) -> str:
    """The unit of the parameter `label`: e for a Born charge ("Z*…"), none for ε∞ ("ε∞…"), eV/Å² for a force
    constant."""
    return "e" if label.startswith("Z*") else "" if label.startswith("ε∞") else "eV/Å²"


@dataclass(frozen=True)
class BornBasis:
    """The symmetry-adapted basis of Born charges and ε∞ of one crystal.

    Attributes:
        charges: (k_z, n, 3, 3), Z* = Σ_i c_i charges[i].
        epsilon: (k_e, 3, 3), ε∞ = Σ_j e_j epsilon[j].
        labels: k_z + k_e names, the entry each basis tensor is 1 at.
    """

    charges: np.ndarray
    epsilon: np.ndarray
    labels: tuple[str, ...]

    @property
    def n_params(self) -> int:
        """k_z + k_e."""
        return len(self.charges) + len(self.epsilon)

    def coefficients(self, charges, epsilon) -> np.ndarray:
        """The least-squares coefficients (k_z + k_e,) of given Z* (n, 3, 3) and ε∞ (3, 3): their symmetric,
        neutral part."""
        parts = []
        for basis, value in ((self.charges, charges), (self.epsilon, epsilon)):
            if len(basis):
                parts.append(np.linalg.lstsq(basis.reshape(len(basis), -1).T, np.ravel(value), rcond=None)[0])
        return np.concatenate(parts) if parts else np.zeros(0)


def cartesian_operations(primitive: Atoms, symprec: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(R (G, 3, 3) Cartesian rotations, perm (G, n): the atom each operation takes each atom to).

    Args:
        primitive: the crystal.
        symprec: spglib's tolerance, Å.

    Returns:
        The rotations and the atom permutations of the space group.
    """
    cell = np.array(primitive.cell[:])
    frac = primitive.get_scaled_positions()
    ops = spglib.get_symmetry((cell, frac, primitive.numbers), symprec=symprec)
    rotations = np.einsum("ia,gij,jb->gab", cell, ops["rotations"], np.linalg.inv(cell).T)  # Aᵀ r A⁻ᵀ
    perm = []
    for r, t in zip(ops["rotations"], ops["translations"]):
        moved = frac @ r.T + t
        diff = moved[:, None, :] - frac[None, :, :]
        perm.append(np.argmin(np.linalg.norm((diff - np.round(diff)) @ cell, axis=-1), axis=1))
    return rotations, np.array(perm)


def _invariant_basis(projector: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(columns (m, k) spanning the range of a projector (m, m), each 1 at one pivot entry and 0 at the others';
    the k pivots, the first entries that are independent)."""
    values, vectors = np.linalg.eigh(0.5 * (projector + projector.T))
    span = vectors[:, values > 0.5]
    pivots = []
    for entry in range(len(span)):
        if len(pivots) == span.shape[1]:
            break
        if np.linalg.matrix_rank(span[pivots + [entry]], tol=1e-8) > len(pivots):
            pivots.append(entry)
    basis = span @ np.linalg.inv(span[pivots]) if pivots else span
    basis[np.abs(basis) < 1e-12] = 0.0
    return basis, pivots


def born_basis(primitive: Atoms, symprec: float = 1e-5) -> BornBasis:
    """The basis of Z* (neutral, symmetric under the space group) and of ε∞ (symmetric, invariant).

    Args:
        primitive: the primitive cell.
        symprec: spglib's tolerance, Å.

    Returns:
        The BornBasis, labels "Z*(<symbol><index>)αβ" (index only where a symbol repeats) and "ε∞αβ".
    """
    rotations, perm = cartesian_operations(primitive, symprec)
    n = len(primitive)
    symmetrise = np.zeros((n * 9, n * 9))
    for rot, p in zip(rotations, perm):
        for k in range(n):
            block = np.einsum("ai,bj->abij", rot, rot).reshape(9, 9)  # (R X Rᵀ)_ab = R_ai X_ij R_bj
            symmetrise[9 * p[k]:9 * p[k] + 9, 9 * k:9 * k + 9] += block / len(rotations)
    neutral = np.eye(9 * n) - np.kron(np.ones((n, n)) / n, np.eye(9))
    charges, z_pivots = _invariant_basis(neutral @ symmetrise)
    eps_sym = sum(np.einsum("ai,bj->abij", r, r).reshape(9, 9) for r in rotations) / len(rotations)
    transpose = np.eye(9).reshape(3, 3, 3, 3).transpose(0, 1, 3, 2).reshape(9, 9)
    epsilon, e_pivots = _invariant_basis(0.5 * (np.eye(9) + transpose) @ eps_sym)
    symbols = primitive.get_chemical_symbols()
    names = [s + (str(i) if symbols.count(s) > 1 else "") for i, s in enumerate(symbols)]
    labels = [f"Z*({names[p // 9]}){AXES[p % 9 // 3]}{AXES[p % 3]}" for p in z_pivots]
    labels += [f"ε∞{AXES[p // 3]}{AXES[p % 3]}" for p in e_pivots]
    return BornBasis(charges.T.reshape(-1, n, 3, 3), epsilon.T.reshape(-1, 3, 3), tuple(labels))


class BornParameters:
    """The Born charges of a `ForceConstantModel`: fixed (`born`), or fitted as parameters after the force constants
    in θ (`born_basis`); a mixin of the model (it uses its θ, `basis`, `primitive`, `symprec`, dtype and device)."""

    def set_born(self, born, fit: bool = False) -> "ForceConstantModel":  # noqa: F821 (the class this mixes into)
        """Give the crystal Born effective charges and ε∞: D(q) gains their dipole–dipole term (`ase_tds.dipole`).

        Args:
            born (BornCharges | None): Z* and ε∞ of the primitive cell's atoms; None removes the term.
            fit: make Z* (in its site-symmetry basis, charge neutral) parameters: θ gains them after the force
                constants, labelled as in `ase_tds.born`, started at their projection. ε∞ stays as given: the
                phonons see the charges through Z*/√ε∞ (for isotropic ε∞ the dipole field is the vacuum's over ε∞),
                so scattering cannot tell Z* from ε∞; give ε∞ from optics or DFT.

        Returns:
            The model itself.
        """
        force_constants = self.theta.detach()[:self.basis.n_params].clone()
        self.born, self.born_basis = None if born is None else born.detach(), None  # fitted charges given: their values
        self.labels = list(self.basis.labels)
        if born is not None and fit:
            full = born_basis(self.primitive, self.symprec)
            self.born_basis = BornBasis(full.charges, full.epsilon[:0], full.labels[:len(full.charges)])
            self.register_buffer("born_charge_basis", torch.as_tensor(self.born_basis.charges, dtype=self.dtype,
                                                                      device=self.device))
            charges = born.charges.detach().cpu().double().numpy()
            start = self.born_basis.coefficients(charges, born.epsilon.detach().cpu().double().numpy())
            force_constants = torch.cat([force_constants, torch.as_tensor(start, dtype=self.dtype, device=self.device)])
            self.labels += list(self.born_basis.labels)
        self.theta = torch.nn.Parameter(force_constants)
        return self

    def born_charges(self):
        """The Born charges (`BornCharges`, differentiable in θ where fitted), or None.

        Raises:
            UnstableError: fitted ε∞ that are not positive definite (a step of a fit too far).
        """
        if self.born is None or self.born_basis is None:
            return super().born_charges()
        from .dipole import BornCharges

        tail = self.theta[self.basis.n_params:]
        k = len(self.born_basis.charges)
        charges = torch.einsum("k,knab->nab", tail[:k], self.born_charge_basis)
        epsilon = self.born.epsilon.to(dtype=self.dtype, device=self.device)  # fixed: see `set_born`
        try:
            return BornCharges(charges, epsilon, self.born.factor, self.born.g_cutoff, self.born.ewald_lambda)
        except ValueError as err:
            raise UnstableError(f"the fitted {err}") from None
