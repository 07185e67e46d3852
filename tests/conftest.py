"""Shared fixtures: a few crystals, cached models, and EMT nickel force constants from phonopy.

Everything expensive is session-scoped; tests that change θ get their own deep copy of a cached model.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.spacegroup import crystal

from ase_tds import ForceConstantModel

logging.getLogger("hiphive").setLevel(logging.WARNING)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n W: the cores shared among the workers, not each its all
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # the subprocesses of the CLI and torchrun tests too

NI_A = 3.52
# fcc primitive vectors as rows, in units of the conventional cell: primitive.cell = Pᵀ · conventional
FCC_PRIMITIVE_MATRIX = np.array([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
# Non-diagonal supercells of the conventional fcc cell (rows = supercell vectors in conventional units):
FCC_64 = np.array([[0, 2, 2], [2, 0, 2], [2, 2, 0]])  # 4×4×4 primitive cells, shortest translation 2√2·a = 9.96 Å
BCC_128 = np.array([[-2, 2, 2], [2, -2, 2], [2, 2, -2]])  # body-centred 4a cube, shortest translation 2√3·a = 12.19 Å


def ni_conventional() -> Atoms:
    return bulk("Ni", "fcc", a=NI_A, cubic=True)


def monoclinic() -> Atoms:
    """A 4-atom P2 (No. 3, b unique) crystal with β = 105°: low symmetry, non-orthogonal cell."""
    return crystal(["Ga", "N"], [(0.2, 0.1, 0.3), (0.6, 0.45, 0.15)], spacegroup=3,
                   cellpar=[3.1, 3.6, 4.2, 90, 105, 90])


def orthorhombic() -> Atoms:
    """A 2-atom Pmmn (No. 59) crystal."""
    return Atoms("Si2", cell=[3.0, 3.4, 4.1], scaled_positions=[[0, 0, 0], [0.5, 0.3, 0.5]], pbc=True)


def cu3au() -> Atoms:
    """L1₂ Cu₃Au (EMT covers both): four atoms, two masses (63.5 and 197 amu)."""
    return Atoms("Cu3Au", cell=3.75 * np.eye(3), pbc=True,
                 scaled_positions=[[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0, 0]])


def triclinic() -> Atoms:
    """A 2-atom P1 crystal: no symmetry but the lattice translations."""
    return Atoms("GaN", cell=[[3.1, 0, 0], [0.4, 3.6, 0], [0.3, 0.2, 4.2]],
                 scaled_positions=[[0, 0, 0], [0.31, 0.27, 0.46]], pbc=True)


DATA = Path(__file__).parent / "data"

# name: (structure factory, model keyword arguments) — small cutoffs, each builds in well under a second
CRYSTALS = {
    "Ni": (ni_conventional, dict(shells=2)),
    "NaCl": (lambda: bulk("NaCl", "rocksalt", a=5.64), dict(shells=2)),
    "Si": (lambda: bulk("Si", "diamond", a=5.43), dict(shells=2)),
    "Mg": (lambda: bulk("Mg", "hcp", a=3.21, c=5.21), dict(shells=3)),
    "monoclinic": (monoclinic, dict(cutoff=2.4)),
    # hexagonal, 3 atoms, two species: phonopy's DFT example (tests/data/dft/MgB2), pairs to 3.6 Å (22 parameters)
    "MgB2": (lambda: mgb2(), dict(cutoff=3.6)),
}


def mgb2() -> Atoms:
    """MgB₂ (P6/mmm) as phonopy's DFT example gives it."""
    import phonopy

    cell = phonopy.load(DATA / "dft" / "MgB2" / "phonopy_params.yaml", produce_fc=False, log_level=0).unitcell
    return Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)

_MODELS: dict = {}


def cached_model(name: str) -> ForceConstantModel:
    """A fresh deep copy of the model of crystal `name` (built once per session)."""
    if name not in _MODELS:
        factory, kwargs = CRYSTALS[name]
        _MODELS[name] = ForceConstantModel(factory(), **kwargs)
    return copy.deepcopy(_MODELS[name])


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


@pytest.fixture(scope="session")
def ni5_model_cached():
    return ForceConstantModel(ni_conventional(), shells=5)


@pytest.fixture
def ni5_model(ni5_model_cached):
    """EMT-independent 5-shell fcc Ni model (θ = 0), a copy free to modify."""
    return copy.deepcopy(ni5_model_cached)


def emt_phonopy(unitcell, supercell_matrix, primitive_matrix, full: bool = True):
    """phonopy finite displacements (0.01 Å) of `unitcell` (PhonopyAtoms) with ASE's EMT, done here without
    ase_tds; force constants produced (full (N, N, 3, 3) when `full`, phonopy's default, else compact)."""
    from ase.calculators.emt import EMT
    from phonopy import Phonopy

    ph = Phonopy(unitcell, supercell_matrix=supercell_matrix, primitive_matrix=primitive_matrix)
    ph.generate_displacements(distance=0.01)
    forces = []
    for cell in ph.supercells_with_displacements:
        atoms = Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)
        atoms.calc = EMT()
        forces.append(atoms.get_forces())
    ph.forces = np.array(forces)
    ph.produce_force_constants(calculate_full_force_constants=full)
    return ph


@pytest.fixture(scope="session")
def emt_ni_phonopy():
    """phonopy finite displacements of EMT Ni: conventional cell, 4×4×4."""
    from phonopy.structure.atoms import PhonopyAtoms

    ni = ni_conventional()
    unitcell = PhonopyAtoms(symbols=ni.get_chemical_symbols(), cell=ni.cell[:],
                            scaled_positions=ni.get_scaled_positions())
    return emt_phonopy(unitcell, 4 * np.eye(3, dtype=int), FCC_PRIMITIVE_MATRIX)
