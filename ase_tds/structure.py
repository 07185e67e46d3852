"""Crystals: the primitive cell of a given structure, neighbour shells and supercells that hold a cutoff.

Lengths are in Å. The primitive cell is kept in the Cartesian frame of the structure it came from, so
that Q vectors computed from hkl of the given (e.g. conventional) cell apply to it unchanged.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from ase import Atoms
from ase.geometry import minkowski_reduce
from ase.neighborlist import neighbor_list
from phonopy.structure.atoms import PhonopyAtoms
from phonopy.structure.cells import get_primitive, guess_primitive_matrix


def reciprocal_vectors(cell) -> np.ndarray:
    """The reciprocal lattice vectors b_i (3, 3) Å⁻¹ as rows, b_i·a_j = 2π δ_ij: 2π·inv(cell)ᵀ.

    Args:
        cell (array_like): lattice vectors a_i (3, 3) Å as rows.

    Returns:
        (3, 3) Å⁻¹, b_i as rows.
    """
    return 2.0 * np.pi * np.linalg.inv(np.asarray(cell, dtype=float)).T


def reciprocal_q(hkl, cell) -> np.ndarray:
    """Cartesian Q (N, 3) in Å⁻¹ from hkl (N, 3) in reciprocal-lattice units of `cell` (3, 3): 2π·hkl·inv(cell)ᵀ.

    Args:
        hkl (array_like): (N, 3) r.l.u. of `cell`.
        cell (array_like): lattice vectors (3, 3) Å as rows.

    Returns:
        Q (N, 3) Å⁻¹, Cartesian.

    Raises:
        TypeError: hkl that are not numbers. ValueError: hkl not of shape (N, 3) or (3,), or not finite.
    """
    try:
        hkl = np.asarray(hkl, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"hkl must be numbers, (N, 3) r.l.u.; got {type(hkl).__name__}") from None
    if hkl.shape[-1:] != (3,) or hkl.ndim > 2:
        raise ValueError(f"hkl must have shape (N, 3) (or (3,) for one point), r.l.u.; got shape {hkl.shape}")
    if not np.isfinite(hkl).all():
        raise ValueError("hkl must be finite numbers (r.l.u.); some are NaN or infinite")
    return hkl @ reciprocal_vectors(cell)


BRAGG_TOLERANCE = 1e-6  # r.l.u. of the primitive cell: a point this close to a reciprocal-lattice vector is on it


def on_bragg_peaks(q, primitive_cell, tolerance: float = BRAGG_TOLERANCE) -> np.ndarray:
    """Which Cartesian Q (N, 3) Å⁻¹ lie on a Bragg peak: within `tolerance` r.l.u. of a reciprocal-lattice vector
    of `primitive_cell` (3, 3) Å (Q = 0 included), where the diffuse intensity is not defined apart from the peak.

    Returns:
        (N,) bool.
    """
    hkl = np.asarray(reduced_q(np.asarray(q, dtype=float).reshape(-1, 3), primitive_cell))
    return np.abs(hkl - np.round(hkl)).max(axis=1) <= tolerance


def reduced_q(q, cell) -> np.ndarray | torch.Tensor:
    """hkl (N, 3) in r.l.u. of `cell` of Cartesian Q (N, 3) Å⁻¹: Q·cellᵀ/2π, the inverse of `reciprocal_q`.

    Args:
        q (array_like | torch.Tensor): Cartesian Q (N, 3) Å⁻¹; a tensor gives a tensor (same dtype and device).
        cell (array_like): lattice vectors (3, 3) Å as rows.

    Returns:
        hkl (N, 3), r.l.u. of `cell`.
    """
    cell = np.asarray(cell, dtype=float)
    if isinstance(q, torch.Tensor):
        return q @ torch.as_tensor(cell, dtype=q.dtype, device=q.device).T / (2 * np.pi)
    return np.asarray(q, dtype=float) @ cell.T / (2 * np.pi)


class StructureError(ValueError):
    """A crystal structure that cannot be used, with the reason and the fix in the message."""


# Atoms closer than this (Å) are taken as overlapping: shorter than any chemical bond (H₂: 0.74 Å).
MIN_INTERATOMIC_DISTANCE = 0.5

# Largest |M − round(M)| of M = cell·inv(primitive) for two cells of one lattice (`integer_matrix`):
# - LATTICE_TOL for cells from two sources (a data file, a CIF, a phonopy file), which agree to the precision of
#   measured lattice constants (~1e-3, as in data.CELL_LENGTH_RTOL);
# - EXACT_LATTICE_TOL where the cell must be the crystal's own at its exact lattice constants (TDSFitted's fixed
#   cell: a 1e-3 strain would move far atoms by ~0.01 Å off their sites, forces by ~0.1 eV/Å).
LATTICE_TOL = 1e-3
EXACT_LATTICE_TOL = 1e-5


def integer_matrix(cell, primitive, what: str, hint: str = "", tol: float = LATTICE_TOL) -> np.ndarray:
    """M = cell · inv(primitive) (3, 3) int, the one check that `cell` is a lattice (supercell) of `primitive`.

    Both are lattice vectors (3, 3) Å as rows in the same Cartesian frame; `cell` spans a sublattice of
    `primitive`'s lattice (the same lattice, a supercell or a conventional cell) exactly when M is an integer
    matrix; a rotated or strained cell makes it non-integer.

    Args:
        cell (array_like): lattice vectors (3, 3) Å as rows (ase.Cell accepted).
        primitive (array_like): lattice vectors (3, 3) Å as rows (ase.Cell accepted).
        what: the start of the refusal: what is wrong, naming the input (e.g. "x.cif: its cell is not a lattice
            of the force constants' crystal"; "" = none).
        hint: the fix, appended to the refusal ("" = none).
        tol: the largest |M − round(M)| accepted (LATTICE_TOL or EXACT_LATTICE_TOL).

    Returns:
        round(M), (3, 3) int.

    Raises:
        StructureError: M is not an integer matrix to within `tol` (the message shows M).
    """
    matrix = np.asarray(cell, dtype=float) @ np.linalg.inv(np.asarray(primitive, dtype=float))
    deviation = float(np.abs(matrix - np.round(matrix)).max())
    if not deviation <= tol:  # NaN too
        prefix, fix = (f"{what}: " if what else ""), (f"; {hint}" if hint else "")
        raise StructureError(f"{prefix}cell · inv(primitive cell) = {np.round(matrix, 4).tolist()} is not an integer "
                             f"matrix (off by {deviation:.2g}, more than {tol:g}){fix}")
    return np.round(matrix).astype(int)


def check_periodic(atoms: Atoms) -> None:
    """Refuse structures that are not fully periodic 3D crystals.

    Args:
        atoms: the structure.

    Raises:
        StructureError: not an ase.Atoms, no atoms, not periodic in all three directions, or a zero-volume cell.
    """
    if not isinstance(atoms, Atoms):
        raise StructureError(f"expected an ase.Atoms crystal, got {type(atoms).__name__}")
    if len(atoms) == 0:
        raise StructureError("the structure has no atoms")
    if not np.all(atoms.pbc):
        raise StructureError(
            f"the structure must be periodic in all three directions (pbc={atoms.pbc.tolist()}); "
            "set atoms.pbc = True and give it a unit cell"
        )
    if abs(atoms.cell.volume) < 1e-6:
        raise StructureError("the structure's cell has zero volume; give it a full 3D unit cell")


def to_phonopy_atoms(atoms: Atoms) -> PhonopyAtoms:
    """The same crystal as phonopy's PhonopyAtoms (symbols, cell Å, scaled positions, masses amu).

    Args:
        atoms: ase.Atoms.

    Returns:
        PhonopyAtoms.
    """
    return PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(),
        cell=np.array(atoms.cell[:]),
        scaled_positions=atoms.get_scaled_positions(),
        masses=atoms.get_masses(),
    )


def to_ase_atoms(atoms: PhonopyAtoms) -> Atoms:
    """The same crystal as a periodic ase.Atoms (symbols, cell Å, scaled positions, masses amu).

    Args:
        atoms: phonopy's PhonopyAtoms (or its Primitive / Supercell).

    Returns:
        ase.Atoms with pbc = True.
    """
    return Atoms(
        symbols=atoms.symbols,
        cell=atoms.cell,
        scaled_positions=atoms.scaled_positions,
        masses=atoms.masses,
        pbc=True,
    )


def find_primitive(atoms: Atoms, symprec: float = 1e-5) -> tuple[Atoms, np.ndarray]:
    """The primitive cell of `atoms` (spglib through phonopy), in the same Cartesian frame.

    Args:
        atoms: periodic ase.Atoms of the crystal.
        symprec: symmetry tolerance, Å (> 0).

    Returns:
        primitive: the primitive cell, in the Cartesian frame of `atoms`.
        primitive_matrix: (3, 3) float with primitive.cell = primitive_matrixᵀ · atoms.cell (phonopy's
            convention for `primitive_matrix`).

    Raises:
        StructureError: a non-periodic structure, symprec ≤ 0, atoms closer than 0.5 Å, or spglib failing.
    """
    check_periodic(atoms)
    if not (np.isfinite(symprec) and symprec > 0):  # spglib crashes (segfault) on a negative one
        raise StructureError(f"symprec must be a positive length in Å (default 1e-5), got {symprec!r}")
    i, j, d = neighbor_list("ijd", atoms, MIN_INTERATOMIC_DISTANCE)
    if len(d):
        k = int(np.argmin(d))
        raise StructureError(
            f"atoms {i[k]} and {j[k]} (or a periodic image) of {atoms.get_chemical_formula()} are {d[k]:.3g} Å "
            f"apart, closer than {MIN_INTERATOMIC_DISTANCE} Å: overlapping atoms; remove duplicates or fix the positions"
        )
    unitcell = to_phonopy_atoms(atoms)
    try:
        matrix = np.asarray(guess_primitive_matrix(unitcell, symprec=symprec), dtype=float)
        primitive = get_primitive(unitcell, matrix, symprec=symprec)
    except Exception as err:  # spglib/phonopy report failures in several ways
        raise StructureError(
            f"spglib could not resolve the symmetry of {atoms.get_chemical_formula()} "
            f"at symprec={symprec} ({err}); check the positions or pass a larger symprec"
        ) from err
    return to_ase_atoms(primitive), matrix


def shortest_lattice_vector(cell: np.ndarray) -> float:
    """Length (Å) of the shortest non-zero translation of the lattice spanned by the rows of `cell`.

    Args:
        cell: lattice vectors (3, 3) Å as rows.

    Returns:
        The length, Å.
    """
    reduced, _ = minkowski_reduce(np.asarray(cell, dtype=float))
    steps = np.array([n for n in itertools.product((-1, 0, 1), repeat=3) if any(n)])
    return float(np.min(np.linalg.norm(steps @ reduced, axis=1)))


def holds_cutoff(cell: np.ndarray, cutoff: float) -> bool:
    """True when every pair closer than `cutoff` is a unique minimum image in this periodic cell.

    Args:
        cell: lattice vectors (3, 3) Å as rows.
        cutoff: pair cutoff, Å.

    Returns:
        True when the shortest translation exceeds 2·cutoff.
    """
    return shortest_lattice_vector(cell) > 2.0 * cutoff


def diagonal_supercell_for(cell: np.ndarray, cutoff: float) -> np.ndarray:
    """The smallest diagonal repetition (3, 3) int of `cell` whose supercell holds `cutoff`.

    Args:
        cell: lattice vectors (3, 3) Å as rows.
        cutoff: pair cutoff, Å.

    Returns:
        diag(L1, L2, L3), (3, 3) int.
    """
    reps = np.ones(3, dtype=int)
    while not holds_cutoff(np.diag(reps) @ cell, cutoff):
        # grow the direction whose repeated vector is shortest
        reps[np.argmin(np.linalg.norm(np.diag(reps) @ cell, axis=1))] += 1
    return np.diag(reps)


SHELL_GAP = 3e-3  # Å: neighbour distances closer than this are one shell (wurtzite ZnO has two 1.1e-3 Å apart)


def pair_distances(primitive: Atoms, rmax: float) -> np.ndarray:
    """Sorted distinct interatomic distances (Å) up to `rmax`, over all atom pairs and images.

    Args:
        primitive: periodic ase.Atoms.
        rmax: largest distance, Å.

    Returns:
        (S,) distances, Å, ascending, the shortest of each shell: distances less than SHELL_GAP apart count as one
        shell (a cutoff cannot lie between them: `basis.check_cutoff` keeps 1e-3 Å from every shell).
    """
    cell = np.array(primitive.cell[:])
    nmax = np.ceil(rmax * np.linalg.norm(np.linalg.inv(cell), axis=0)).astype(int) + 1
    grid = np.array(list(itertools.product(*[range(-n, n + 1) for n in nmax])))
    pos = primitive.positions
    d = pos[None, :, None, :] + (grid @ cell)[:, None, None, :] - pos[None, None, :, :]
    r = np.linalg.norm(d, axis=-1).ravel()
    r = np.sort(r[(r > 1e-6) & (r <= rmax)])
    return r[np.diff(r, prepend=-np.inf) > SHELL_GAP]


def cutoff_for_shells(primitive: Atoms, shells: int) -> float:
    """A cutoff (Å) mid-way between neighbour shell `shells` and the next one.

    Args:
        primitive: periodic ase.Atoms.
        shells: number of neighbour shells to include (≥ 1).

    Returns:
        The cutoff, Å.

    Raises:
        StructureError: shells not a positive integer.
    """
    if int(shells) != shells or shells < 1:
        raise StructureError(f"shells must be a positive integer, got {shells!r}")
    rmax = 2.0 * max(np.linalg.norm(primitive.cell[:], axis=1).max(), 1.0)
    while True:
        radii = pair_distances(primitive, rmax)
        if len(radii) > shells:
            return float(0.5 * (radii[shells - 1] + radii[shells]))
        rmax *= 1.5
