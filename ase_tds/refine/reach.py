"""How far a potential's force constants reach past the refined range (docs/refine.md, "Range").

The data see the force-constant model θ(w): the potential's force constants within the model's cutoff. Used on its
own, the potential has all of them. Where they reach further, its own phonons differ from the model's by an error
that the fit's χ² and 1σ cannot see (SevenNet-0 on Si: 0.41 THz at 4 shells, 0.05 at 10; CHGNet on Ni: 0.054 at 5
shells). Here: the potential's own force constants (phonopy's finite displacements of its forces on a diagonal
supercell that holds REACH × the model's cutoff), their difference from θ's as the fixed far term `refine` adds to
the model (`far_force_constants`), and the check of the potential's own phonons against the model's (`truncation`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from ase import Atoms

from ..structure import diagonal_supercell_for, to_phonopy_atoms

REACH = 1.5  # the supercell of the potential's own phonons holds this multiple of the model's cutoff
TOLERANCE_THZ = 0.02  # a truncation error above this is warned about: about the 1σ of TDS-fitted frequencies


def potential_phonopy(potential, model, displacement: float = 0.01):
    """phonopy.Phonopy of the potential's own force constants (full layout, eV/Å²) at its current weights: phonopy's
    finite displacements of its forces on a diagonal supercell of `model.unitcell` holding REACH × `model.cutoff`."""
    from phonopy import Phonopy

    cell = np.array(model.unitcell.cell[:])
    ph = Phonopy(to_phonopy_atoms(model.unitcell), supercell_matrix=diagonal_supercell_for(cell, REACH * model.cutoff),
                 primitive_matrix=model.primitive_matrix, symprec=model.symprec, log_level=0)
    ph.generate_displacements(distance=displacement)
    cells = [Atoms(c.symbols, cell=c.cell, positions=c.positions, pbc=True) for c in ph.supercells_with_displacements]
    _, forces = potential.energy_forces(cells)
    ph.forces = np.array([f.detach().cpu().numpy() for f in forces])
    ph.produce_force_constants()
    return ph


def potential_frequencies(potential, model, q, displacement: float = 0.01) -> np.ndarray:
    """The potential's own phonons ν (B, 3n) THz at Cartesian q (B, 3) Å⁻¹ (`potential_phonopy`; no range imposed)."""
    return _frequencies(potential_phonopy(potential, model, displacement), q)


def _frequencies(ph, q) -> np.ndarray:
    ph.run_qpoints(np.asarray(q, dtype=float) @ np.array(ph.primitive.cell).T / (2 * np.pi))
    return np.array(ph.qpoints.frequencies)


def far_force_constants(ph, model):
    """The force constants of `ph` (`potential_phonopy`) less the model's at its current θ, as a fixed source
    (PhonopyForceConstants) for `ForceConstantModel.set_far`: with them the model's D(q) is the potential's own at
    this θ, and stays so to first order while θ moves the pairs within the cutoff."""
    from ..phonopy_source import PhonopyForceConstants

    ph = copy.deepcopy(ph)
    layout = "full" if ph.force_constants.shape[0] == ph.force_constants.shape[1] else "compact"
    with torch.no_grad():
        ph.force_constants = ph.force_constants - model.force_constants(ph, layout).cpu().numpy()
    return PhonopyForceConstants(ph)


def truncation(ph, model, q) -> dict:
    """{"largest_THz", "supercell_atoms", "reach_A"}: the largest |ν_potential − ν_model| at q (B, 3) Å⁻¹, the
    potential's phonons those of `ph` (`potential_phonopy`), the model's at its current θ."""
    return {"largest_THz": float(np.abs(_frequencies(ph, q) - model.frequencies(q)).max()),
            "supercell_atoms": len(ph.supercell), "reach_A": REACH * model.cutoff}
