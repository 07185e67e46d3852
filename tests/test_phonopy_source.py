"""PhonopyForceConstants: phonopy's force constants as they are, against phonopy's own DynamicalMatrix."""

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from phonopy import Phonopy

from ase_tds import ForceConstantModel, PhonopyForceConstants, simulate
from ase_tds.structure import reciprocal_q
from ase_tds.structure import to_phonopy_atoms

from conftest import FCC_PRIMITIVE_MATRIX, cu3au, emt_phonopy, ni_conventional


CASES = {  # name: (structure, supercell matrix, primitive matrix, compact force constants)
    "Ni fcc 2x2x2 conventional, full": (ni_conventional, np.diag([2, 2, 2]), FCC_PRIMITIVE_MATRIX, False),
    "Ni hcp 3x3x2, compact": (lambda: bulk("Ni", "hcp", a=2.49, c=4.07), np.diag([3, 3, 2]), "P", True),
    "Cu3Au 2x2x2, full": (cu3au, np.diag([2, 2, 2]), "P", False),
}


@pytest.mark.parametrize("name", CASES)
def test_dynamical_matrix_equals_phonopys(name):
    structure, supercell_matrix, primitive_matrix, compact = CASES[name]
    ph = emt_phonopy(to_phonopy_atoms(structure()), supercell_matrix, primitive_matrix, full=not compact)
    assert ph.primitive.get_smallest_vectors()[1][..., 0].max() > 1  # pairs shared by several images
    source = PhonopyForceConstants(ph)
    q_reduced = np.random.default_rng(7).uniform(-1, 1, size=(24, 3))
    q_reduced[:3] = [[0.5, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.5, 0]]
    ours = source.dynamical_matrix(reciprocal_q(q_reduced, ph.primitive.cell)).numpy()
    theirs = []
    for q in q_reduced:
        ph.dynamical_matrix.run(q)
        theirs.append(ph.dynamical_matrix.dynamical_matrix)
    theirs = np.array(theirs)
    assert np.abs(ours - theirs).max() <= 1e-12 * np.abs(theirs).max()
    ph.run_qpoints(q_reduced)
    np.testing.assert_allclose(source.frequencies(reciprocal_q(q_reduced, ph.primitive.cell)),
                               ph.qpoints.frequencies, rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def cu3au_model():
    return ForceConstantModel(cu3au(), shells=1).set_from_calculator(EMT(), progress=False)


@pytest.mark.parametrize("method", ["one-phonon", "gaussian"])
@pytest.mark.parametrize("statistics", ["classical", "quantum"])
def test_simulate_equals_the_models_when_the_files_come_from_it(cu3au_model, method, statistics):
    model = cu3au_model
    source = PhonopyForceConstants(model.to_phonopy(np.diag([2, 2, 2])))
    hkl = np.random.default_rng(5).uniform(-3, 3, size=(40, 3))
    hkl[:2] = [[1, 0, 0], [0.5, 0.5, 0]]  # a Γ point of the primitive lattice, and a zone boundary
    options = dict(grid=(5, 5, 5), dw_mesh=4)
    ours = simulate(source, hkl, 300.0, method=method, statistics=statistics, tds_options=options)
    reference = simulate(model, hkl, 300.0, method=method, statistics=statistics, tds_options=options)
    np.testing.assert_allclose(ours.intensity, reference.intensity, rtol=1e-12)


def test_refuses_phonopy_data_without_force_constants():
    ph = Phonopy(to_phonopy_atoms(ni_conventional()), supercell_matrix=np.diag([2, 2, 2]), primitive_matrix="P")
    with pytest.raises(ValueError, match="no force constants"):
        PhonopyForceConstants(ph)
