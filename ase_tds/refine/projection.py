"""Forces of displaced supercells → θ: a linear map, as a matrix, so that θ(weights) is differentiable.

`ForceConstantModel.set_from_calculator` displaces atoms (phonopy), computes the forces, lets phonopy solve for the
force constants and projects them on the symmetry basis. Here the same displaced supercells (phonopy's) are used and
θ is the least-squares solution of the harmonic forces F_d = −Φ(θ)·u_d of every displaced supercell d directly in the
symmetry basis: θ = M·F, M = pinv(A) (n_params, n_disp·N·3), A the forces per unit θ_k. For harmonic forces both
routes give the same θ; for a real potential they differ by its anharmonicity at the displacement (≈ 1e-4 of θ for
nickel at 0.01 Å: tests/test_refine.py). M is built in a second; phonopy's solver, applied to each unit force to
tabulate its own matrix, took minutes. θ(weights) = M·F(weights): its vector–Jacobian product is gᵀM·∂F/∂w.
"""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from tqdm.auto import tqdm

from ..dynamical import fold_pairs
from ..structure import StructureError, diagonal_supercell_for, holds_cutoff, to_phonopy_atoms


# supercell shapes (rows: the supercell's vectors in units of the unit cell's), repeated n times in `compact_supercell`
SIMPLE_CUBIC_LIKE = np.eye(3, dtype=int)
BODY_CENTRED_LIKE = np.array([[-1, 1, 1], [1, -1, 1], [1, 1, -1]])
FACE_CENTRED_LIKE = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]])


def compact_supercell(model) -> np.ndarray:
    """The supercell matrix (3, 3) int relative to `model.unitcell` with the fewest atoms that holds the cutoff, of the
    diagonal repetitions and n × the simple, body- and face-centred shapes (a conventional fcc cell at Ni's five
    shells: the body-centred 128 atoms, against 256 of the 4×4×4 repetition)."""
    cell = np.array(model.unitcell.cell[:])
    candidates = [diagonal_supercell_for(cell, model.cutoff)]
    for shape in (SIMPLE_CUBIC_LIKE, BODY_CENTRED_LIKE, FACE_CENTRED_LIKE):
        n = 1
        while not holds_cutoff((n * shape) @ cell, model.cutoff):
            n += 1
        candidates.append(n * shape)
    return min(candidates, key=lambda m: abs(round(np.linalg.det(m))))


class DisplacementProjection:
    """The displaced supercells of a crystal and the matrix M (n_params, n_disp·N·3) with θ = M·F (eV/Å², F eV/Å).

    Args:
        model (ForceConstantModel): the crystal and its symmetry basis (no Born charges: a refined potential's
            force constants are short ranged as it computes them).
        supercell_matrix (array_like | None): (3, 3) int relative to model.unitcell; None: `compact_supercell`.
        displacement: Å, phonopy's finite displacement.
        progress: a progress bar over the displaced supercells while M is built.

    Attributes:
        supercells: the displaced supercells (ase.Atoms), phonopy's order.
        matrix: M (n_params, n_disp·N·3) float64 torch tensor.

    Raises:
        StructureError: a supercell too small to determine every θ, or a model with Born charges.
    """

    def __init__(self, model, supercell_matrix=None, displacement: float = 0.01, progress: bool = True):
        from phonopy import Phonopy

        if model.born is not None:
            raise StructureError("refining a potential takes a model without Born charges (the potential's own "
                                 "forces hold its long-range part)")
        self.supercell_matrix = compact_supercell(model) if supercell_matrix is None else np.asarray(supercell_matrix)
        self.displacement = displacement
        ph = Phonopy(to_phonopy_atoms(model.unitcell), supercell_matrix=self.supercell_matrix.T,
                     primitive_matrix=model.primitive_matrix, symprec=model.symprec)
        ph.generate_displacements(distance=displacement)
        self.supercells = [Atoms(c.symbols, cell=c.cell, positions=c.positions, pbc=True)
                           for c in ph.supercells_with_displacements]
        self.matrix = torch.as_tensor(self._build(model, ph, progress))

    @property
    def n_atoms(self) -> int:
        """Atoms N of the supercell."""
        return len(self.supercells[0])

    def _build(self, model, ph, progress: bool) -> np.ndarray:
        """M = pinv(A): A (n_disp·N·3, n_params) the forces −Φ_k(j, a_d)·u_d of each displaced supercell per unit θ_k."""
        sc = ph.supercell
        tensors = torch.as_tensor(model.basis.tensors).permute(1, 2, 3, 0)  # (P, 3, 3, n_params)
        blocks = []
        for first in tqdm(ph.dataset["first_atoms"], desc="force → θ map", disable=not progress, leave=False):
            atom, u = first["number"], np.asarray(first["displacement"], dtype=float)
            entries = model.supercell_columns(sc.positions, sc.cell, [atom])
            row = fold_pairs(tensors, entries, 1, len(sc))[0].numpy()  # Φ_k(a, j) (N, 3, 3, n_params)
            blocks.append(-np.einsum("jbak,b->jak", row, u).reshape(-1, model.basis.n_params))  # Φ(j, a) = Φ(a, j)ᵀ
        design = np.concatenate(blocks)
        if np.linalg.matrix_rank(design) < model.basis.n_params:
            raise StructureError(f"the displaced supercells of {self.supercell_matrix.tolist()} do not determine every "
                                 f"force constant of the model (cutoff {model.cutoff:.3f} Å); give a larger supercell")
        return np.linalg.pinv(design)

    def theta(self, forces) -> torch.Tensor:
        """θ (n_params,) eV/Å² float64 of the displaced supercells' forces [(N, 3) eV/Å], differentiable in them."""
        stacked = torch.cat([f.reshape(-1) for f in forces]).to(self.matrix.dtype)
        return self.matrix @ stacked

    def theta_of(self, potential, create_graph: bool = False) -> torch.Tensor:
        """θ (n_params,) eV/Å² of `potential` (a Potential) at its current weights."""
        _, forces = potential.energy_forces(self.supercells, create_graph=create_graph)
        return self.theta(forces)
