"""Properties of a potential that a refinement should leave alone: the lattice constant and the bulk modulus from its
equation of state, by its own energies."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.eos import EquationOfState
from ase.units import GPa

EOS_STRAINS = np.linspace(-0.03, 0.03, 7)  # isotropic strains of the equation of state


def equation_of_state(potential, structure: Atoms) -> dict:
    """The Birch–Murnaghan fit of E(V) over isotropic strains of `structure` (EOS_STRAINS, atoms fixed in fractional
    coordinates): {"lattice_scale": a₀/a of the structure, "volume_A3" V₀ per cell, "bulk_modulus_GPa",
    "energy_eV" E₀ per cell}."""
    cells = [Atoms(structure.numbers, cell=structure.cell[:] * (1 + s), scaled_positions=structure.get_scaled_positions(),
                   pbc=True) for s in EOS_STRAINS]
    energies, _ = potential.energy_forces(cells)
    volumes = [c.get_volume() for c in cells]
    v0, e0, b = EquationOfState(volumes, energies.numpy(), eos="birchmurnaghan").fit()
    return {"lattice_scale": float((v0 / structure.get_volume()) ** (1 / 3)), "volume_A3": float(v0),
            "bulk_modulus_GPa": float(b / GPa), "energy_eV": float(e0)}
