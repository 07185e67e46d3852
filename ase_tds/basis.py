"""Symmetry-adapted basis of second-order force constants: θ ↔ Φ.

symfc builds a basis of force constants obeying the space group, the index-permutation symmetry and
the acoustic sum rule on a supercell that holds the cutoff. We store it as a list of atom pairs
(κ0; κ'l') of the primitive cell, which makes it independent of any supercell, and re-parametrise it
so that every parameter is minus one element of one neighbour's 3×3 block — the Born–von Kármán
convention of the published tables (for fcc: `1XX` = −Φ_xx(0; (½,½,0)a)). On-site blocks then follow
from the sum rule.
"""

from __future__ import annotations

import itertools

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from symfc.basis_sets import FCBasisSetO2
from symfc.utils.utils import SymfcAtoms

from .structure import StructureError, diagonal_supercell_for, pair_distances

AXES = "XYZ"
# Preference order of block elements for labels: diagonal, then upper, then lower triangle.
ELEMENT_ORDER = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1), (2, 1), (2, 0), (1, 0)]
# Largest supercell symfc is asked to handle (≈1 min and 2 GB at 1700 atoms for fcc Ni).
MAX_BASIS_SUPERCELL_ATOMS = 2500


@dataclass(frozen=True)
class ForceConstantBasis:
    """Force constants Φ(θ) as pairs: Φ_p = Σ_k θ_k tensors[k, p], p over pairs (κ0; κ'l').

    Built by `build_basis`; frozen.

    Args:
        atom0: (P,) int — primitive-cell atoms κ.
        atom1: (P,) int — primitive-cell atoms κ'.
        lattice: (P, 3) int — l', the cell of κ' in primitive-lattice coordinates.
        vectors: (P, 3) float, Å — r_κ'l' − r_κ0 (Cartesian).
        tensors: (n_params, P, 3, 3) float — eV/Å² per unit θ.
        labels: (n_params,) parameter names, e.g. "1XX".
        shells: (n_params,) int neighbour shell of each parameter.
        cutoff: Å, the pair cutoff the basis was built for.
    """

    atom0: np.ndarray
    atom1: np.ndarray
    lattice: np.ndarray
    vectors: np.ndarray
    tensors: np.ndarray
    labels: list
    shells: np.ndarray
    cutoff: float

    @property
    def n_params(self) -> int:
        """Number of parameters θ."""
        return self.tensors.shape[0]

    def pair_force_constants(self, theta: np.ndarray) -> np.ndarray:
        """Φ per pair, (P, 3, 3) eV/Å², for parameters θ (n_params,).

        Args:
            theta: θ (n_params,) eV/Å².

        Returns:
            Φ_p (P, 3, 3) eV/Å².
        """
        return np.einsum("k,kpab->pab", theta, self.tensors)

    def project(self, pair_fc: np.ndarray) -> np.ndarray:
        """Least-squares θ for per-pair force constants (P, 3, 3).

        Args:
            pair_fc: Φ_p (P, 3, 3) eV/Å², pairs in the basis's order.

        Returns:
            θ (n_params,) eV/Å² minimising Σ_p |Φ_p(θ) − pair_fc_p|².
        """
        design = self.tensors.reshape(self.n_params, -1).T
        return np.linalg.lstsq(design, pair_fc.reshape(-1), rcond=None)[0]


def check_cutoff(primitive: Atoms, cutoff: float) -> None:
    """Refuse cutoffs that are not positive or that lie on a neighbour shell (symfc's `<` is fragile there).

    Args:
        primitive: ase.Atoms, the primitive cell.
        cutoff: pair cutoff, Å.

    Raises:
        StructureError: a cutoff ≤ 0 or not finite, on a shell (within 1e-3 Å), holding no neighbour, or
            needing a basis supercell of more than MAX_BASIS_SUPERCELL_ATOMS (2500) atoms.
    """
    if not np.isfinite(cutoff) or cutoff <= 0:
        raise StructureError(f"cutoff must be a positive length in Å, got {cutoff!r}")
    # the basis supercell's shortest translation must exceed 2·cutoff, so its volume is at least
    # (2·cutoff)³/√2 (densest lattice packing): a lower bound on its number of atoms
    n_atoms = len(primitive) * (2.0 * cutoff) ** 3 / np.sqrt(2.0) / abs(primitive.cell.volume)
    if n_atoms > MAX_BASIS_SUPERCELL_ATOMS:
        raise StructureError(
            f"cutoff {cutoff:g} Å is too large: its basis needs a supercell of at least {n_atoms:.0f} atoms "
            f"(limit {MAX_BASIS_SUPERCELL_ATOMS}); use a smaller cutoff or fewer shells"
        )
    radii = pair_distances(primitive, cutoff + 0.01)
    if len(radii) == 0:
        raise StructureError(
            f"cutoff {cutoff:g} Å holds no neighbour (nearest at "
            f"{pair_distances(primitive, 10 * cutoff + 10)[0]:.3f} Å); use a larger cutoff or shells=1"
        )
    on_shell = radii[np.abs(radii - cutoff) < 1e-3]
    if on_shell.size:
        raise StructureError(
            f"cutoff {cutoff:g} Å lies on the neighbour shell at {on_shell[0]:.4f} Å; "
            "choose a cutoff between two shells (or pass shells=N)"
        )


def build_basis(primitive: Atoms, cutoff: float, symprec: float = 1e-5) -> ForceConstantBasis:
    """The labelled force-constant basis of `primitive` up to `cutoff` (Å), via symfc.

    Args:
        primitive: ase.Atoms, the primitive cell.
        cutoff: pair cutoff, Å (between two neighbour shells).
        symprec: symmetry tolerance, Å (as spglib's).

    Returns:
        The basis: n_params parameters over the P pairs within the cutoff.

    Raises:
        StructureError: a bad cutoff (see `check_cutoff`), or no force constants allowed within it.
    """
    check_cutoff(primitive, cutoff)
    reps = np.diag(diagonal_supercell_for(np.array(primitive.cell[:]), cutoff))
    supercell = primitive.repeat(tuple(reps))  # atom index = cell_index * n + κ
    symfc = FCBasisSetO2(
        SymfcAtoms(
            numbers=supercell.numbers,
            scaled_positions=supercell.get_scaled_positions(),
            cell=np.array(supercell.cell[:]),
        ),
        cutoff=cutoff,
        symprec=symprec,
        log_level=0,
    ).run()
    n_super = len(supercell)
    # (n_basis, n_patom, N, 3, 3), rows in symfc's p2s_map order
    compact = (symfc.compact_compression_matrix @ symfc.basis_set).T.reshape(-1, len(symfc.p2s_map), n_super, 3, 3)
    atom0, atom1, lattice, vectors, columns = _pairs_within(primitive, supercell, symfc.p2s_map, cutoff)
    tensors = compact[:, columns[:, 0], columns[:, 1]]
    if tensors.shape[0] == 0:
        raise StructureError(f"no force constants are allowed within {cutoff:g} Å; increase the cutoff")
    return _labelled(primitive, atom0, atom1, lattice, vectors, tensors, cutoff)


def _pairs_within(primitive, supercell, p2s_map, cutoff):
    """Pairs (κ0; κ'l') with |r_κ'l' − r_κ0| < cutoff, and their (row, column) in symfc's compact array."""
    n = len(primitive)
    cell_p = np.array(primitive.cell[:])
    cell_s = np.array(supercell.cell[:])
    frac = supercell.get_scaled_positions()
    rows = {int(s) % n: (row, int(s)) for row, s in enumerate(p2s_map)}
    if sorted(rows) != list(range(n)):
        raise RuntimeError("symfc's p2s_map does not cover the primitive cell once")
    # rounding fractional coordinates finds the nearest image only in orthogonal cells: search the 27 images
    # around it (a vector shorter than the cutoff has one image within it, as the supercell holds the cutoff)
    images = np.array(list(itertools.product((-1, 0, 1), repeat=3)))
    out = ([], [], [], [], [])
    for kappa in range(n):
        row, s = rows[kappa]
        dfrac = frac - frac[s]
        dfrac -= np.round(dfrac)
        d_all = (dfrac[:, None, :] + images[None]) @ cell_s  # (N, 27, 3)
        near, image = np.nonzero(np.linalg.norm(d_all, axis=2) < cutoff)
        for j, d_j in zip(near, d_all[near, image]):
            kappa1 = j % n
            origin = primitive.positions[kappa1]
            lat = np.linalg.solve(cell_p.T, primitive.positions[kappa] + d_j - origin)
            out[0].append(kappa)
            out[1].append(kappa1)
            out[2].append(np.round(lat).astype(int))
            out[3].append(d_j)
            out[4].append((row, j))
    atom0, atom1, lattice, vectors, columns = (np.array(x) for x in out)
    return atom0, atom1, lattice, vectors, columns


def _labelled(primitive, atom0, atom1, lattice, vectors, tensors, cutoff):
    """Re-parametrise so that θ_i = −Φ at one chosen element of one neighbour block, labelled."""
    n_basis = tensors.shape[0]
    dist = np.linalg.norm(vectors, axis=1)
    radii = pair_distances(primitive, cutoff)
    shell = np.array([0 if r < 1e-6 else int(np.argmin(np.abs(radii - r))) + 1 for r in dist])
    # candidate pairs: by shell, then atom pair, then lexicographically largest vector first
    keys = sorted(
        (i for i in range(len(dist)) if shell[i] > 0),
        key=lambda i: (shell[i], atom0[i], atom1[i], *(-np.round(vectors[i], 6))),
    )
    chosen, rows = [], []
    orth = np.zeros((0, n_basis))
    for p in keys:
        for a, b in ELEMENT_ORDER:
            functional = tensors[:, p, a, b]
            residual = functional - orth.T @ (orth @ functional)
            norm = np.linalg.norm(residual)
            if norm > 1e-8 * max(1.0, np.linalg.norm(functional)):
                orth = np.vstack([orth, residual / norm])
                chosen.append((p, a, b))
                rows.append(functional)
        if len(chosen) == n_basis:
            break
    if len(chosen) != n_basis:
        raise RuntimeError("the force-constant basis is not determined by its off-site elements")
    # θ = −rows · c  ⇒  c = −rows⁻¹ θ ; new tensors = Σ_k c_k tensors[k]
    new = -np.einsum("ki,kpab->ipab", np.linalg.inv(np.array(rows)), tensors)
    new[np.abs(new) < 1e-12] = 0.0
    labels = _label_names(primitive, chosen, shell, atom0, atom1)
    return ForceConstantBasis(
        atom0=atom0,
        atom1=atom1,
        lattice=lattice,
        vectors=vectors,
        tensors=new,
        labels=labels,
        shells=np.array([shell[p] for p, _, _ in chosen]),
        cutoff=float(cutoff),
    )


def _label_names(primitive, chosen, shell, atom0, atom1):
    symbols = primitive.get_chemical_symbols()
    unique_species = len(set(symbols)) == len(symbols)
    labels = []
    for p, a, b in chosen:
        name = f"{shell[p]}{AXES[a]}{AXES[b]}"
        if len(primitive) > 1:
            k0, k1 = atom0[p], atom1[p]
            tag = f"{symbols[k0]}-{symbols[k1]}" if unique_species else f"{symbols[k0]}{k0}-{symbols[k1]}{k1}"
            name += f"({tag})"
        while name in labels:  # a second inequivalent neighbour in the same shell and atom pair
            name += "'"
        labels.append(name)
    return labels
