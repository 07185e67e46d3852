"""Dipole–dipole forces of Born effective charges: the Gonze–Lee Ewald sum, as phonopy computes it.

A polar crystal's Born effective charges Z*_κ and high-frequency dielectric tensor ε∞ add to the
dynamical matrix a long-ranged, non-analytic term (Gonze & Lee, PRB 55, 10355 (1997)). phonopy's
`DynamicalMatrixGL` keeps its reciprocal-space Ewald part D_dd(q) and leaves the short-ranged rest to the
force constants: D(q) = D_short(q) + D_dd(q), with D_short interpolated from FC_short = FC − FC_dd. This
module is a torch port of that D_dd (differentiable in Z* and ε∞, batched over q, on the device and dtype
of the charges) and of FC_dd, the dipole force constants of a periodic supercell that phonopy subtracts.

Conventions (phonopy's, checked against it in tests/test_dipole.py):
- Z*[κ, α, β] = ∂F_κβ/∂E_α = (Ω/e) ∂P_α/∂u_κβ, in e: row α the electric field / polarisation direction,
  column β the atomic displacement (phonopy's `nac_params["born"]`, BORN file rows).
- D_dd(q)_{κα,κ'β} = f·(4π/Ω)/√(m_κ m_κ') · [Σ_K (K·Z*_κ)_α (K·Z*_κ')_β e^{−K·ε∞·K/4Λ²}/(K·ε∞·K)
  · e^{iG·(r_κ − r_κ')} − δ_κκ' S_κ,αβ], K = q + G over the G with |G| < G_c (lengths without 2π here, as
  phonopy's), S_κ the q = 0 self term (phonopy's `dd_q0`) that keeps the acoustic sum rule;
  f = e²/4πε₀ = 14.40 eV·Å (phonopy's `factor`, Hartree·Bohr), so D_dd is in eV/Å²/amu like D(q).
- Phases from atomic positions: D_dd(q₀ + G)_ij = D_dd(q₀)_ij e^{iG·(r_j − r_i)}. phonopy's sum is centred
  on G = 0 and valid only for q in the first Brillouin zone; here every q is reduced to the first zone and
  carries that phase, so any q is valid.
- Ewald parameters as phonopy's defaults: G_c = (3·300/4πΩ)^{1/3} Å⁻¹ (300 G vectors),
  Λ = G_c·√(tr ε∞/3 / (4 ln 10¹⁰)) (so the Gaussian is 10⁻¹⁰ at G_c); Λ follows ε∞ (differentiably)
  unless fixed, as a BORN file may fix G_c and Λ.
- At q = Γ (|q|/2π < 10⁻⁵ Å⁻¹, phonopy's tolerance) the G = 0 term depends on the direction of approach:
  with a `q_direction` it is (d·Z*)(d·Z*)/(d·ε∞·d), the LO–TO splitting; without one it is left out, the
  analytic part only, which is what phonopy's D(Γ) is without a direction.
- Accuracy: phonopy's sphere leaves out the G whose Gaussian is below 10⁻¹⁰; near zone faces D_dd then differs
  from the converged Ewald sum by up to ~10⁻⁸ relative, and on a face it depends at that level on which of
  the equivalent q is summed (so `dipole_force_constants` sums at phonopy's own representatives).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from ase import Atoms
from ase.geometry import minkowski_reduce
from phonopy.physical_units import get_physical_units

from .structure import to_phonopy_atoms

_UNITS = get_physical_units()
# e²/(4πε₀) in eV·Å (Hartree·Bohr = 14.3997): phonopy's NAC `factor` for eV/Å force constants
NAC_FACTOR = float(_UNITS.Hartree * _UNITS.Bohr)
# phonopy's DynamicalMatrixGL defaults: G vectors in the sphere, Gaussian left at G_c, |q| treated as Γ (Å⁻¹, no 2π)
NUM_G_POINTS = 300
EXP_CUTOFF = 1e-10
Q_ZERO_TOL = 1e-5
# Directions of approach to Γ and their weights: the 26-point Lebedev rule (exact for polynomials of degree 7 on the
# sphere), folded to 13 since the non-analytic term is even in the direction. A Γ point of a mesh stands for the
# cell around it, where the covariance depends on the direction alone: its average over these directions.
_AXES = np.eye(3)
_FACES = np.array([[1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1], [0, 1, 1], [0, 1, -1]]) / np.sqrt(2)
_BODIES = np.array([[1, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]]) / np.sqrt(3)
GAMMA_DIRECTIONS = (np.vstack([_AXES, _FACES, _BODIES]),
                    np.concatenate([np.full(3, 2 / 21), np.full(6, 8 / 105), np.full(4, 9 / 140)]))
# complex entries of one chunk of the per-G Born products (B·n_G·3n): bounds memory for large batches
_CHUNK_ENTRIES = 2**22
# Å: an atom of another cell matches one of ours when its position differs by less than this (modulo lattice)
_POSITION_TOL = 1e-3


class BornCharges:
    """Born effective charges Z* (n, 3, 3) e and ε∞ (3, 3) of a primitive cell, as phonopy's `nac_params`.

    A value object holding torch tensors: make them `nn.Parameter`s (or functions of them) to fit them;
    every function of this module is differentiable in both.

    Args:
        charges (array_like | torch.Tensor): Z*[κ, α, β] (n, 3, 3) e, atoms in the order of the primitive
            cell used with it; α the field (polarisation) direction, β the displacement (phonopy's `born`).
        epsilon (array_like | torch.Tensor): ε∞ (3, 3), symmetric positive definite.
        factor: e²/4πε₀ in eV·Å (phonopy's `factor`; a BORN file may state its own, e.g. 14.400).
        g_cutoff: G_c in Å⁻¹ without 2π; None for phonopy's default (300 G vectors).
        ewald_lambda: Λ in Å⁻¹ without 2π; None to follow ε∞ as phonopy does.
        dtype: torch dtype when the inputs are not tensors already (default float64).

    Raises:
        ValueError: wrong shapes, or ε∞ not symmetric positive definite.
    """

    def __init__(self, charges, epsilon, factor: float = NAC_FACTOR, g_cutoff: float | None = None,
                 ewald_lambda: float | None = None, dtype: torch.dtype = torch.float64):
        charges = torch.as_tensor(charges, dtype=charges.dtype if torch.is_tensor(charges) else dtype)
        epsilon = torch.as_tensor(epsilon, dtype=charges.dtype, device=charges.device)
        if charges.ndim != 3 or charges.shape[1:] != (3, 3) or epsilon.shape != (3, 3):
            raise ValueError(f"Born charges must be (n, 3, 3) and ε∞ (3, 3); got {tuple(charges.shape)} and "
                             f"{tuple(epsilon.shape)}")
        with torch.no_grad():
            eps = epsilon.detach().cpu().double().numpy()
            if not np.allclose(eps, eps.T, atol=1e-8) or np.linalg.eigvalsh((eps + eps.T) / 2).min() <= 0:
                raise ValueError(f"ε∞ must be symmetric positive definite, got {np.round(eps, 6).tolist()}")
        self.charges, self.epsilon = charges, epsilon
        self.factor = float(factor)
        self.g_cutoff = None if g_cutoff is None else float(g_cutoff)
        self.ewald_lambda = None if ewald_lambda is None else float(ewald_lambda)

    def __repr__(self) -> str:
        return (f"BornCharges(n={self.n_atoms}, ε∞ diag={np.round(np.diag(self._eps_np()), 4).tolist()}, "
                f"factor={self.factor:.6g} eV·Å)")

    @property
    def n_atoms(self) -> int:
        """Atoms n of the primitive cell."""
        return int(self.charges.shape[0])

    @property
    def charge_sum(self) -> torch.Tensor:
        """Σ_κ Z*_κ (3, 3) e: zero for a charge-neutral set (the acoustic sum rule of the charges)."""
        return self.charges.sum(0)

    def _eps_np(self) -> np.ndarray:
        return self.epsilon.detach().cpu().double().numpy()

    def to(self, dtype: torch.dtype | None = None, device=None) -> "BornCharges":
        """The same charges as tensors of `dtype` on `device` (a new object; gradients flow through).

        Args:
            dtype: torch dtype (default: unchanged).
            device (torch.device | str | None): torch device (default: unchanged).

        Returns:
            BornCharges.
        """
        return BornCharges(self.charges.to(dtype=dtype, device=device), self.epsilon.to(dtype=dtype, device=device),
                           self.factor, self.g_cutoff, self.ewald_lambda)

    def detach(self) -> "BornCharges":
        """The same values, out of any autograd graph (a new object): what a model keeps as its given charges."""
        return BornCharges(self.charges.detach(), self.epsilon.detach(), self.factor, self.g_cutoff, self.ewald_lambda)

    def nac_params(self, primitive: Atoms, reference=None) -> dict:
        """phonopy's `nac_params` dict (numpy): born, dielectric, factor (and G_cutoff, Lambda when fixed).

        Args:
            primitive: the primitive cell (ase.Atoms) whose atom order the charges follow.
            reference (phonopy.Phonopy | PhonopyAtoms | None): the phonopy cell the dict is for; its primitive's
                atom order is used (matched by positions). None: `primitive`'s order.

        Returns:
            dict for `Phonopy.nac_params` / `phonopy.load(nac_params=...)`.
        """
        born = self.charges.detach().cpu().double().numpy()
        if reference is not None:
            ref = getattr(reference, "primitive", reference)
            born = born[atom_map(ref.positions, ref.cell, primitive, "the reference cell", ref.numbers)]
        params = {"born": np.ascontiguousarray(born), "dielectric": self._eps_np().copy(), "factor": self.factor}
        if self.g_cutoff is not None:
            params["G_cutoff"] = self.g_cutoff
        if self.ewald_lambda is not None:
            params["Lambda"] = self.ewald_lambda
        return params

    @classmethod
    def from_phonopy_born(cls, source, primitive: Atoms, reference=None, symprec: float = 1e-5,
                          symmetrize: bool = True, dtype: torch.dtype = torch.float64) -> "BornCharges":
        """Born charges from phonopy: a BORN file, a phonopy.Phonopy with NAC, or a `nac_params` dict.

        A BORN file lists only symmetry-independent atoms; phonopy's `parse_BORN` expands them by the
        symmetry of `reference` (default: `primitive`); then, like `phonopy.load`, phonopy's
        `symmetrize_borns_and_epsilon` imposes the site symmetry and charge neutrality. A Phonopy gives the
        charges its dynamical matrix uses (symmetrised by phonopy), or its `nac_params` as they are when it has
        no force constants yet. The result follows `primitive`'s atom order (matched by positions).

        Args:
            source (str | Path | phonopy.Phonopy | dict): BORN path, Phonopy (with nac_params), or nac_params.
            primitive: our primitive cell (ase.Atoms), in the Cartesian frame of the charges.
            reference (phonopy.Phonopy | PhonopyAtoms | None): the cell a BORN file or dict was written for
                (default: `primitive` itself; for a Phonopy source, its primitive cell).
            symprec: symmetry tolerance for the BORN expansion, Å.
            symmetrize: symmetrise a BORN file's or dict's values as phonopy.load does (not for a Phonopy).
            dtype: torch dtype of the tensors.

        Returns:
            BornCharges in `primitive`'s atom order.

        Raises:
            FileNotFoundError: no such BORN file.
            ValueError: an unreadable BORN file, a Phonopy without Born charges, or cells that do not match.
        """
        params, ref = _read_nac_params(source, primitive, reference, symprec)
        born, eps = np.asarray(params["born"], dtype=float), np.asarray(params["dielectric"], dtype=float)
        if symmetrize and not hasattr(source, "primitive"):  # what phonopy.load does to a BORN file's values
            from phonopy.structure.symmetry import symmetrize_borns_and_epsilon

            born, eps = symmetrize_borns_and_epsilon(born, eps, ref, symprec=symprec)
        order = atom_map(ref.positions, ref.cell, primitive, "phonopy's primitive cell", ref.numbers)
        ours = np.zeros((len(primitive), 3, 3))
        ours[order] = born
        return cls(ours, eps, params.get("factor", NAC_FACTOR), params.get("G_cutoff"), params.get("Lambda"),
                   dtype=dtype)


def _read_nac_params(source, primitive: Atoms, reference, symprec: float):
    """(nac_params dict, phonopy cell it refers to) from a BORN path, a Phonopy, or a dict."""
    if isinstance(source, (str, os.PathLike)):
        from phonopy.file_IO import parse_BORN

        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no BORN file at {path}: give phonopy's BORN (factor, ε∞, Z* of each "
                                    "symmetry-independent atom)")
        ref = getattr(reference, "primitive", reference) if reference is not None else to_phonopy_atoms(primitive)
        try:
            return parse_BORN(ref, symprec=symprec, filename=path), ref
        except Exception as err:  # phonopy raises BORNFileParseError, ValueError or IndexError
            raise ValueError(f"{path}: not a BORN file phonopy can read for this {len(ref)}-atom primitive cell "
                             f"({err}); line 1 the factor, line 2 ε∞ (9 numbers), then 9 numbers of Z* per "
                             "symmetry-independent atom") from err
    if isinstance(source, dict):
        ref = getattr(reference, "primitive", reference) if reference is not None else to_phonopy_atoms(primitive)
        return source, ref
    params = getattr(source, "nac_params", None)
    if params is None:
        raise ValueError("the phonopy object carries no Born charges: load it with "
                         "phonopy.load(..., born_filename='BORN', is_nac=True) or pass the BORN file")
    params = dict(params)
    dm = getattr(source, "dynamical_matrix", None)
    if dm is not None and hasattr(dm, "born"):  # the symmetrised charges phonopy actually uses
        params.update(born=dm.born, dielectric=dm.dielectric_constant)
    return params, source.primitive


def atom_map(positions, cell, primitive: Atoms, what: str, numbers=None) -> np.ndarray:
    """Index in `primitive` of each atom of another cell of the same crystal (matched modulo the lattice).

    Args:
        positions (array_like): Cartesian positions (n, 3) Å of the other cell's atoms.
        cell (array_like): its lattice vectors (3, 3) Å as rows (the same lattice as `primitive`'s).
        primitive: our primitive cell (ase.Atoms).
        what: the other cell's name, for error messages.
        numbers (array_like | None): its atomic numbers (n,), checked when given.

    Returns:
        (n,) int: atom p of the other cell is atom result[p] of `primitive`.

    Raises:
        ValueError: another lattice, another number of atoms, or atoms that match no site or the same one.
    """
    ours = np.array(primitive.cell[:], dtype=float)
    transform = np.asarray(cell, dtype=float) @ np.linalg.inv(ours)
    if not np.allclose(transform, np.rint(transform), atol=1e-5) or abs(abs(np.linalg.det(transform)) - 1) > 1e-5:
        raise ValueError(f"{what} is not a primitive cell of the same lattice (and Cartesian frame) as the "
                         "primitive cell given: use the phonopy object built from this crystal")
    positions = np.asarray(positions, dtype=float).reshape(-1, 3)
    if len(positions) != len(primitive):
        raise ValueError(f"{what} has {len(positions)} atoms, the primitive cell {len(primitive)}")
    order = site_index(positions, primitive, what, numbers)
    if len(set(order.tolist())) != len(order):
        raise ValueError(f"two atoms of {what} sit on the same site of the primitive cell given")
    return order


def site_index(positions, primitive: Atoms, what: str, numbers=None) -> np.ndarray:
    """The site of `primitive` each atom sits on, modulo the primitive lattice.

    Args:
        positions (array_like): Cartesian positions (N, 3) Å, in `primitive`'s frame.
        primitive: our primitive cell (ase.Atoms).
        what: the atoms' name, for error messages.
        numbers (array_like | None): their atomic numbers (N,), checked when given.

    Returns:
        (N,) int indices into `primitive`.

    Raises:
        ValueError: an atom on no site (tolerance 1e-3 Å), or another species than the site's.
    """
    ours = np.array(primitive.cell[:], dtype=float)
    positions = np.asarray(positions, dtype=float).reshape(-1, 3)
    diff = positions[:, None, :] @ np.linalg.inv(ours) - primitive.get_scaled_positions(wrap=False)[None]
    dist = np.linalg.norm((diff - np.rint(diff)) @ ours, axis=-1)
    order = np.argmin(dist, axis=1)
    if np.any(dist[np.arange(len(order)), order] > _POSITION_TOL):
        raise ValueError(f"the atoms of {what} do not sit on the sites of the primitive cell given "
                         f"(tolerance {_POSITION_TOL} Å): not the same crystal")
    if numbers is not None and not np.array_equal(np.asarray(numbers), primitive.numbers[order]):
        raise ValueError(f"the species of {what} differ from those of the primitive cell on the same sites")
    return order


def g_vectors(cell, g_cutoff: float) -> np.ndarray:
    """Every reciprocal lattice vector G with |G| < G_c, (n_G, 3) Å⁻¹ without 2π (phonopy's G list).

    Args:
        cell (array_like): lattice vectors (3, 3) Å as rows.
        g_cutoff: G_c, Å⁻¹ without 2π.

    Returns:
        (n_G, 3) Cartesian G·/2π, Å⁻¹.
    """
    cell = np.asarray(cell, dtype=float)
    rec = np.linalg.inv(cell).T  # rows b_i, b_i·a_j = δ_ij
    # |n_i| = |G·a_i| ≤ G_c |a_i|: a complete box for the sphere, whatever the cell's shape
    n_max = np.floor(g_cutoff * np.linalg.norm(cell, axis=1)).astype(int) + 1
    grid = np.array(list(itertools.product(*(range(-m, m + 1) for m in n_max))), dtype=float)
    vectors = grid @ rec
    return vectors[np.linalg.norm(vectors, axis=1) < g_cutoff]


def ewald_parameters(primitive: Atoms, born: BornCharges) -> tuple[np.ndarray, torch.Tensor]:
    """phonopy's Gonze–Lee G list and Λ for this cell and these charges.

    Args:
        primitive: primitive cell (ase.Atoms).
        born: its Born charges.

    Returns:
        G (n_G, 3) Å⁻¹ without 2π (numpy), and Λ (0-dim tensor, Å⁻¹ without 2π; a function of ε∞ unless
        fixed by `born.ewald_lambda`).
    """
    volume = abs(np.linalg.det(np.array(primitive.cell[:], dtype=float)))
    g_cutoff = born.g_cutoff or (3 * NUM_G_POINTS / (4 * np.pi) / volume) ** (1.0 / 3)
    eps = born.epsilon
    if born.ewald_lambda is not None:
        lam = torch.tensor(born.ewald_lambda, dtype=eps.dtype, device=eps.device)
    else:
        lam = torch.sqrt(g_cutoff**2 * torch.trace(eps) / 3 / (4 * np.log(1 / EXP_CUTOFF)))
    return g_vectors(primitive.cell[:], g_cutoff), lam


def first_zone(k: torch.Tensor, cell) -> tuple[torch.Tensor, torch.Tensor]:
    """k = k₀ + g with k₀ in the first Brillouin zone: the nearest reciprocal lattice vector g removed.

    A k already in the (closed) first zone is kept as it is (g = 0), as phonopy evaluates it.

    Args:
        k (torch.Tensor): Cartesian wave vectors (B, 3) Å⁻¹ without 2π.
        cell (array_like): lattice vectors (3, 3) Å as rows.

    Returns:
        k₀ (B, 3) and g (B, 3), Å⁻¹ without 2π.
    """
    reduced = np.asarray(minkowski_reduce(np.linalg.inv(np.asarray(cell, dtype=float)).T)[0], dtype=float)
    rec = torch.as_tensor(reduced, dtype=k.dtype, device=k.device)
    offsets = torch.tensor(list(itertools.product(range(-2, 3), repeat=3)), dtype=k.dtype, device=k.device)
    centre = torch.round(k @ torch.linalg.inv(rec))
    candidates = (centre[:, None, :] + offsets[None]) @ rec  # (B, 125, 3)
    dist = torch.linalg.norm(k[:, None, :] - candidates, dim=-1)
    best = dist.argmin(1)
    g = candidates[torch.arange(len(k), device=k.device), best]
    inside = torch.linalg.norm(k, dim=-1) <= dist.min(1).values + 1e-12 * (1 + rec.norm())
    g = torch.where(inside[:, None], torch.zeros_like(g), g)
    return k - g, g


def at_gamma(q: torch.Tensor, cell) -> torch.Tensor:
    """(B,) bool: where the dipole–dipole term of q (B, 3) Å⁻¹ (with 2π) is non-analytic: q within Q_ZERO_TOL of a
    reciprocal lattice vector (`first_zone`, lengths without 2π).

    Args:
        q: Cartesian q (B, 3) Å⁻¹.
        cell (array_like): lattice vectors (3, 3) Å as rows (the primitive cell).

    Returns:
        True (B,) where the term depends on the direction of approach.
    """
    k0, _ = first_zone(q / (2 * np.pi), cell)
    return torch.linalg.norm(k0, dim=-1) < Q_ZERO_TOL


def _unit_sum(k0, direction, gvec, positions, epsilon, lam) -> torch.Tensor:
    """Σ_G w(K) K_m K_m' e^{2πiG·(r_κ − r_κ')}, K = k₀ + G: phonopy's `get_dd` with unit charges, rows (κ, m).

    w(K) = e^{−KεK/4Λ²}/KεK; at K = 0 (|K| < Q_ZERO_TOL) w = 1/dεd with K → d, the direction of
    approach, or the term is dropped where the direction is zero.

    Args:
        k0: (B, 3) first-zone wave vectors, Å⁻¹ without 2π.
        direction: (B, 3) Cartesian direction of approach to Γ (zero rows: none).
        gvec: (n_G, 3) G vectors, Å⁻¹ without 2π.
        positions: (n, 3) Cartesian positions, Å.
        epsilon: ε∞ (3, 3); lam: Λ (0-dim), Å⁻¹ without 2π.

    Returns:
        (B, 3n, 3n) complex, Å⁻²·Å² (dimensionless).
    """
    kvec = k0[:, None, :] + gvec[None]  # (B, G, 3)
    at_gamma = torch.linalg.norm(kvec, dim=-1) < Q_ZERO_TOL
    has_dir = torch.linalg.norm(direction, dim=-1) > 0
    unit = torch.zeros_like(direction)
    unit[:, 0] = 1.0
    towards = torch.where(has_dir[:, None], direction, unit)  # a harmless stand-in where no direction is given
    kvec = torch.where(at_gamma[..., None], towards[:, None, :].expand_as(kvec), kvec)
    kek = torch.einsum("bgi,ij,bgj->bg", kvec, epsilon, kvec)
    gauss = torch.where(at_gamma, torch.ones_like(kek), torch.exp(-kek / (4 * lam**2)))
    weight = torch.where(at_gamma & ~has_dir[:, None], torch.zeros_like(kek), gauss / kek)
    angle = 2 * np.pi * gvec @ positions.T  # (G, n)
    phase = torch.polar(torch.ones_like(angle), angle)
    amp = (phase[None, :, :, None] * kvec[:, :, None, :].to(phase.dtype)).reshape(len(k0), len(gvec), -1)  # (B, G, 3n)
    return (amp * weight[..., None]).transpose(1, 2) @ amp.conj()


class DipoleKernel(NamedTuple):
    """The Gonze–Lee sum of unit charges, scaled: C_dd(q) = Z̄ᵀ K(q) Z̄ − self term, Z̄ = diag(Z*_κ) (3n, 3n).

    Z* enters the dipole–dipole term bilinearly, so at fixed ε∞ and q the sum over G is done once and fitted
    charges cost two small products per q (`contract_charges`).

    Attributes:
        total: K(q) (B, 3n, 3n) complex, eV/Å²/e², rows (κ, m): the sum at q with the phases of q's first-zone
            reduction.
        zero: K(0) (3n, 3n) complex, eV/Å²/e², without the G = 0 term: phonopy's `dd_q0` before the charges.
    """

    total: torch.Tensor
    zero: torch.Tensor


def dipole_kernel(q, primitive: Atoms, born: BornCharges, q_direction=None, reduce: bool = True) -> DipoleKernel:
    """The unit-charge Gonze–Lee sums at Cartesian q (B, 3) Å⁻¹ (with 2π): differentiable in ε∞, not in Z*.

    Args:
        q, q_direction: as `dipole_dynamical_matrix`.
        primitive: primitive cell (ase.Atoms).
        born: its Born charges (only ε∞, the factor and the Ewald parameters are read).
        reduce: False sums around q as given (phonopy's way: right only for q in the first zone).

    Returns:
        DipoleKernel on the charges' device, complex dtype.
    """
    epsilon = born.epsilon
    real = dict(dtype=epsilon.dtype, device=epsilon.device)
    cell = np.array(primitive.cell[:], dtype=float)
    k = torch.as_tensor(q, **real).reshape(-1, 3) / (2 * np.pi)
    direction = torch.zeros_like(k) if q_direction is None else \
        torch.as_tensor(q_direction, **real).reshape(-1, 3).expand_as(k)
    k0, shift = first_zone(k, cell) if reduce else (k, torch.zeros_like(k))
    gvec_np, lam = ewald_parameters(primitive, born)
    gvec = torch.as_tensor(gvec_np, **real)
    positions = torch.as_tensor(primitive.positions, **real)
    n = len(positions)
    step = max(1, _CHUNK_ENTRIES // (len(gvec) * 3 * n))
    total = torch.cat([_unit_sum(k0[i:i + step], direction[i:i + step], gvec, positions, epsilon, lam)
                       for i in range(0, len(k), step)])
    zero = torch.zeros(1, 3, **real)
    # D(q₀ + G)_ij = D(q₀)_ij e^{iG·(r_j − r_i)}
    back = torch.polar(torch.ones(len(k), n, **real), -2 * np.pi * shift @ positions.T).repeat_interleave(3, 1)
    scale = born.factor * 4 * np.pi / abs(np.linalg.det(cell))
    return DipoleKernel(total * back[:, :, None] * back.conj()[:, None, :] * scale,
                        _unit_sum(zero, zero, gvec, positions, epsilon, lam)[0] * scale)


def contract_charges(kernel: DipoleKernel, charges: torch.Tensor) -> torch.Tensor:
    """C_dd(q) = √(m m')·D_dd(q), (B, 3n, 3n) complex eV/Å², from the unit-charge sums and Z* (n, 3, 3) e.

    Raises ValueError where the charges are not one per atom of the kernel's cell.

    (Z̄ᵀ K Z̄)_{κα,κ'β} = Σ_mm' Z*_κ,mα K_{κm,κ'm'} Z*_κ',m'β; the self term is the Hermitian part of
    Σ_κ' (Z̄ᵀ K(0) Z̄)_κκ' on each diagonal block (phases of the first-zone reduction cancel there).
    """
    n = len(charges)
    if 3 * n != kernel.zero.shape[0]:
        raise ValueError(f"{n} Born charges for a primitive cell of {kernel.zero.shape[0] // 3} atoms")
    block = torch.block_diag(*charges).to(kernel.total.dtype)  # Z̄, rows (κ, m), columns (κ, α)
    total = block.T @ kernel.total @ block
    summed = (block.T @ kernel.zero @ block).reshape(n, 3, n, 3).sum(2)
    own = (summed + summed.conj().transpose(1, 2)) / 2
    diagonal = torch.einsum("ij,ixy->ixjy", torch.eye(n, dtype=own.dtype, device=own.device), own)
    return total - diagonal.reshape(3 * n, 3 * n)


def _dipole_blocks(q, primitive: Atoms, born: BornCharges, q_direction=None, reduce: bool = True) -> torch.Tensor:
    """C_dd(q) = √(m m')·D_dd(q), (B, 3n, 3n) complex eV/Å², for Cartesian q (B, 3) Å⁻¹ (with 2π).

    reduce=False sums around q as given (phonopy's way: right only for q in the first zone).
    """
    return contract_charges(dipole_kernel(q, primitive, born, q_direction, reduce), born.charges)


def dipole_dynamical_matrix(q, primitive: Atoms, born: BornCharges, q_direction=None, masses=None,
                            kernel: DipoleKernel | None = None) -> torch.Tensor:
    """D_dd(q) (B, 3n, 3n) complex eV/Å²/amu: phonopy's Gonze–Lee dipole–dipole term, at any q.

    Add it to the short-range D(q) (`ForceConstantModel.dynamical_matrix`, same units, phases and q):
    D(q) = D_short(q) + D_dd(q) is what phonopy's `DynamicalMatrixGL` gives. Differentiable in
    `born.charges` and `born.epsilon`; computed on their device and dtype.

    Args:
        q (array_like | torch.Tensor): Cartesian q (B, 3) Å⁻¹ (with 2π, as `ForceConstantModel`); any q,
            reduced to the first zone internally with the phase e^{iG·(r_j − r_i)}.
        primitive: primitive cell (ase.Atoms); its positions set the phases, its order the rows.
        born: Born charges of `primitive`'s atoms.
        q_direction (array_like | torch.Tensor | None): Cartesian direction (B, 3) or (3,) of approach to Γ,
            any length, used only where q is Γ or a reciprocal lattice vector (|q₀|/2π < 1e-5 Å⁻¹; a zero
            row counts as none). None: at Γ the non-analytic G = 0 term is left out (phonopy without
            `q_direction`).
        masses (array_like | None): (n,) amu; default `primitive.get_masses()`.
        kernel: `dipole_kernel` of these q, direction and ε∞, to reuse (fitted charges at fixed ε∞); None
            computes it.

    Returns:
        (B, 3n, 3n) complex, eV/Å²/amu, rows (κ, α).
    """
    if kernel is None:
        blocks = _dipole_blocks(q, primitive, born, q_direction)
    else:
        blocks = contract_charges(kernel, born.charges)
    mass = torch.as_tensor(primitive.get_masses() if masses is None else masses, dtype=born.charges.dtype,
                           device=born.charges.device)
    inv_sqrt = torch.repeat_interleave(mass.rsqrt(), 3)
    return blocks * (inv_sqrt[:, None] * inv_sqrt[None, :]).to(blocks.dtype)


def _supercell_geometry(supercell, primitive: Atoms, layout: str):
    """Positions x (N, 3) Å, our site of each atom (N,), the rows of `layout`, reduced q and the cell they use.

    The commensurate q are first-zone representatives chosen by phonopy's `BrillouinZone`, as its
    `make_Gonze_nac_dataset` chooses them (on a zone face its truncated sum depends on the one chosen).
    """
    from phonopy import Phonopy

    if isinstance(supercell, Atoms):
        pcell = np.array(primitive.cell[:], dtype=float)
        matrix = np.array(supercell.cell[:], dtype=float) @ np.linalg.inv(pcell)  # rows: supercell = matrix·cell
        if not np.allclose(matrix, np.rint(matrix), atol=1e-5) or round(abs(np.linalg.det(matrix))) < 1:
            raise ValueError("the supercell's lattice vectors are not integer combinations of the primitive cell's")
        kind = site_index(supercell.positions, primitive, "the supercell", supercell.numbers)
        if np.any(np.bincount(kind, minlength=len(primitive)) != round(abs(np.linalg.det(matrix)))):
            raise ValueError("the supercell does not hold every site of the primitive cell once per lattice point")
        rows = np.array([np.flatnonzero(kind == a)[0] for a in range(len(primitive))])
        smat, positions = np.rint(matrix).astype(int).T, supercell.positions
    else:
        if not (hasattr(supercell, "supercell") and hasattr(supercell, "primitive")):
            matrix = np.asarray(supercell)
            if matrix.shape not in ((3,), (3, 3)) or not np.allclose(matrix, np.rint(matrix)):
                raise ValueError("supercell must be a phonopy.Phonopy, an ase.Atoms supercell, or an integer "
                                 f"(3, 3) / (3,) supercell matrix of the primitive cell; got {matrix.tolist()}")
            supercell = Phonopy(to_phonopy_atoms(primitive), supercell_matrix=np.rint(matrix).astype(int),
                                primitive_matrix=np.eye(3))
        prim, scell = supercell.primitive, supercell.supercell
        ours = atom_map(prim.positions, prim.cell, primitive, "phonopy's primitive cell", prim.numbers)
        kind = ours[[prim.p2p_map[i] for i in prim.s2p_map]]
        rows, pcell = np.asarray(prim.p2s_map), np.asarray(prim.cell, dtype=float)
        smat, positions = np.rint(np.linalg.inv(prim.primitive_matrix)).astype(int), scell.positions
    q_red = commensurate_points(pcell, smat)
    rows = rows if layout == "compact" else np.arange(len(positions))
    return np.asarray(positions, dtype=float), kind, rows, q_red, pcell


def commensurate_points(cell, supercell_matrix) -> np.ndarray:
    """The commensurate q of a supercell at phonopy's first-zone representatives, as `make_Gonze_nac_dataset` sums
    them: FC_dd depends on the one chosen on a zone face at the level of its truncated sum, so every route to a
    periodic supercell's dipole terms takes these (DenseSampler and QSpaceSampler both). The q are exact rationals
    (phonopy's `get_commensurate_points` to round-off, without its supercell trimming, which takes 20 s for 4000 q),
    moved by phonopy's `BrillouinZone` (the first shortest).

    Args:
        cell (array_like): primitive lattice vectors (3, 3) Å as rows.
        supercell_matrix (array_like): integer (3, 3), phonopy's: the supercell's lattice vectors as columns, in
            `cell`'s.

    Returns:
        q (N_q, 3) in r.l.u. of `cell`, N_q = |det supercell_matrix|.
    """
    from phonopy.structure.brillouin_zone import BrillouinZone

    m = np.array(supercell_matrix, dtype=np.int64).T  # q commensurate ⇔ m q integer
    det = int(round(np.linalg.det(m)))
    adjugate = np.rint(np.linalg.inv(m) * det).astype(np.int64)  # m⁻¹ = adjugate/det, integer cofactors
    lower = m.copy()  # lower-triangular by unimodular column operations: q = m⁻¹ n, n in the box of its diagonal
    for i, j in ((0, 1), (0, 2), (1, 2)):
        while lower[i, j] != 0:
            lower[:, i] -= lower[i, i] // lower[i, j] * lower[:, j]
            lower[:, [i, j]] = lower[:, [j, i]]
    box = np.stack(np.meshgrid(*(np.arange(abs(lower[i, i])) for i in range(3)), indexing="ij"), -1).reshape(-1, 3)
    zone = BrillouinZone(np.linalg.inv(np.asarray(cell, dtype=float)))
    zone.run(((box @ adjugate.T) % abs(det)) / abs(det))
    return np.array([points[0] for points in zone.shortest_qpoints], dtype=float).reshape(-1, 3)


def dipole_force_constants(supercell, primitive: Atoms, born: BornCharges, layout: str = "compact") -> torch.Tensor:
    """FC_dd of a periodic supercell, eV/Å²: the force constants phonopy subtracts in its Gonze–Lee NAC.

    FC_dd(κ0; s) = (1/N_q) Σ_q C_dd(q)_κκ' e^{−iq·(r_s − r_κ0)} over the supercell's commensurate q
    (C_dd = √(m m')·D_dd): the dipole–dipole forces of the supercell with all its periodic images.
    A phonopy file holding FC = FC_short + FC_dd and these charges (`BornCharges.nac_params`) gives,
    with `phonopy.load(..., is_nac=True)`, D_short(q) + D_dd(q) at every q (D_short from FC_short).

    Args:
        supercell (phonopy.Phonopy | ase.Atoms | array_like): a Phonopy of this crystal (its supercell and
            primitive, phonopy's atom order); an ase.Atoms supercell of `primitive` (its own atom order, in
            `primitive`'s frame, e.g. for an ASE calculator); or an integer supercell matrix (3, 3) / (3,) of
            `primitive` (phonopy's supercell of it, phonopy's order).
        primitive: our primitive cell (ase.Atoms), the order of `born`.
        born: Born charges of `primitive`'s atoms.
        layout: "compact" (n_p, N, 3, 3) or "full" (N, N, 3, 3). Compact rows are phonopy's p2s_map, or for
            an ase.Atoms supercell the first atom on each site of `primitive`, in `primitive`'s order.

    Returns:
        FC_dd real tensor, eV/Å², differentiable in the charges and ε∞.

    Raises:
        ValueError: an unknown layout, a bad supercell matrix, or a cell not of this crystal.
    """
    if layout not in ("compact", "full"):
        raise ValueError(f"layout must be 'compact' or 'full', got {layout!r}")
    positions, kind, rows, q_red, pcell = _supercell_geometry(supercell, primitive, layout)
    real = dict(dtype=born.charges.dtype, device=born.charges.device)
    q = torch.as_tensor(2 * np.pi * q_red @ np.linalg.inv(pcell).T, **real)
    n = len(primitive)
    blocks = _dipole_blocks(q, primitive, born, reduce=False).reshape(-1, n, 3, n, 3)
    x = torch.as_tensor(positions, **real)
    phase = torch.polar(torch.ones(len(q), len(x), **real), q @ x.T)  # e^{iq·x_s}, (N_q, N)
    fc = torch.zeros(len(rows), len(x), 3, 3, **real)
    for a, b in itertools.product(range(n), repeat=2):
        r = np.flatnonzero(kind[rows] == a)
        c = np.flatnonzero(kind == b)
        weighted = phase[:, rows[r], None, None] * blocks[:, None, a, :, b, :]  # (N_q, R, 3, 3)
        val = torch.einsum("qrxy,qc->rcxy", weighted, phase[:, c].conj()).real / len(q)
        index = (torch.as_tensor(r, device=fc.device)[:, None], torch.as_tensor(c, device=fc.device)[None, :])
        fc = fc.index_put(index, val)
    return fc
