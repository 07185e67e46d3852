"""The symmetry-adapted basis: parameter counts and the symmetries of Φ(θ), each against an independent route.

Counts: symfc run directly on a supercell, and hiPhive's ClusterSpace (a different symmetry code).
Symmetries of Φ: acoustic sum rule, index permutation, and every space-group operation of the supercell
as spglib (through phonopy) reports it, with the atom permutation each one induces computed here.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, make_supercell
from ase.neighborlist import neighbor_list
from hiphive import ClusterSpace
from phonopy.harmonic.force_constants import compact_fc_to_full_fc
from symfc.basis_sets import FCBasisSetO2
from symfc.utils.utils import SymfcAtoms

from ase_tds import ForceConstantModel
from ase_tds.structure import diagonal_supercell_for

from conftest import BCC_128, CRYSTALS, NI_A, cached_model, monoclinic, ni_conventional, orthorhombic, triclinic


def shell_radii(atoms, rmax):
    """Distinct interatomic distances (Å) up to rmax, from ASE's neighbour list (independent of ase_tds)."""
    d = np.sort(neighbor_list("d", atoms, rmax))
    return d[np.concatenate([[True], np.diff(d) > 1e-4])]


def shortest_translation(cell):
    """Shortest non-zero lattice vector (Å), by brute force over small integer combinations."""
    n = np.array([(i, j, k) for i in range(-3, 4) for j in range(-3, 4) for k in range(-3, 4) if (i, j, k) != (0, 0, 0)])
    return np.linalg.norm(n @ np.asarray(cell), axis=1).min()


def hiphive_dofs(model):
    return ClusterSpace(model.primitive, [model.cutoff]).n_dofs


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("shells, expected", [(1, 3), (2, 5), (3, 9), (4, 12), (5, 16)])
def test_fcc_ni_counts_match_symfc_and_hiphive(shells, expected, ni5_model_cached):
    ni = ni_conventional()
    model = ni5_model_cached if shells == 5 else ForceConstantModel(ni, shells=shells)
    # the cutoff sits strictly between shell `shells` and the next (fcc radii a·√(s/2))
    radii = NI_A * np.sqrt(np.arange(1, 8) / 2)
    assert radii[shells - 1] + 0.05 < model.cutoff < radii[shells] - 0.05
    assert model.n_params == expected
    assert len(model.labels) == len(set(model.labels)) == expected
    assert model.labels[:3] == ["1XX", "1ZZ", "1XY"]  # the published fcc BvK names of the first shell

    # symfc run directly on a supercell that holds the cutoff: the smallest conventional n×n×n one, or for
    # 5 shells (11.66 Å needed) the 128-atom body-centred one (12.19 Å) rather than 4×4×4 (256 atoms)
    n = int(np.floor(2 * model.cutoff / NI_A)) + 1
    sc = ni.repeat((n, n, n)) if n < 4 else make_supercell(ni, BCC_128)
    assert shortest_translation(sc.cell[:]) > 2 * model.cutoff
    symfc = FCBasisSetO2(SymfcAtoms(numbers=sc.numbers, scaled_positions=sc.get_scaled_positions(),
                                    cell=np.array(sc.cell[:])), cutoff=model.cutoff, log_level=0).run()
    assert symfc.basis_set.shape[1] == expected
    assert hiphive_dofs(model) == expected


@pytest.mark.parametrize(
    "name, atoms, kwargs",
    [
        ("NaCl rock salt", bulk("NaCl", "rocksalt", a=5.64), dict(shells=3)),
        ("Si diamond (non-symmorphic)", bulk("Si", "diamond", a=5.43), dict(shells=3)),
        ("Mg hcp (non-cubic, non-symmorphic)", bulk("Mg", "hcp", a=3.21, c=5.21), dict(shells=3)),
        ("monoclinic P2", monoclinic(), dict(cutoff=2.4)),
        ("orthorhombic Pmmn", orthorhombic(), dict(cutoff=3.5)),
        ("triclinic P1", triclinic(), dict(cutoff=3.3)),
    ],
)
def test_counts_match_hiphive(name, atoms, kwargs):
    model = ForceConstantModel(atoms, **kwargs)
    n_dofs = hiphive_dofs(model)
    assert model.n_params == n_dofs, name
    assert len(set(model.labels)) == model.n_params
    # the primitive cell is the structure's primitive cell (spglib) in the same Cartesian frame
    assert len(model.primitive) * round(atoms.cell.volume / model.primitive.cell.volume) == len(atoms)
    # and the cutoff lies mid-gap, away from any neighbour shell (ASE's neighbour list)
    radii = shell_radii(model.primitive, model.cutoff + 1.0)
    assert np.min(np.abs(radii - model.cutoff)) > 1e-3
    if "shells" in kwargs:
        assert np.sum(radii < model.cutoff) == kwargs["shells"]
        # symfc's own count on a supercell of the primitive cell agrees too
        sc = model.primitive.repeat(tuple(np.diag(diagonal_supercell_for(model.primitive.cell[:], model.cutoff))))
        symfc = FCBasisSetO2(SymfcAtoms(numbers=sc.numbers, scaled_positions=sc.get_scaled_positions(),
                                        cell=np.array(sc.cell[:])), cutoff=model.cutoff, log_level=0).run()
        assert symfc.basis_set.shape[1] == n_dofs


# ----------------------------------------------------------------------------- symmetries of Φ(θ)
def atom_permutation(frac, rotation, translation):
    """perm[i] = j with frac_j ≡ R·frac_i + t (mod 1), for fractional positions of one cell."""
    image = frac @ rotation.T + translation
    diff = image[:, None, :] - frac[None, :, :]
    diff -= np.round(diff)
    dist = np.linalg.norm(diff, axis=-1)
    perm = np.argmin(dist, axis=1)
    assert np.all(dist[np.arange(len(frac)), perm] < 1e-6), "operation does not map the supercell onto itself"
    assert len(set(perm.tolist())) == len(frac)
    return perm


@pytest.mark.parametrize("name", list(CRYSTALS))
def test_full_force_constants_symmetries(name, rng):
    model = cached_model(name)
    model.set_parameters(rng.normal(size=model.n_params))
    if name == "Ni":  # a non-diagonal supercell of the conventional cell: 4×4×4 primitive fcc cells, 64 atoms
        supercell_matrix = np.array([[0, 2, 2], [2, 0, 2], [2, 2, 0]])
    else:
        supercell_matrix = diagonal_supercell_for(model.unitcell.cell[:], model.cutoff)
    ph = model.to_phonopy(supercell_matrix)
    full = model.force_constants(ph, "full").detach().numpy()
    compact = model.force_constants(ph, "compact").detach().numpy()
    n = len(ph.supercell)
    assert full.shape == (n, n, 3, 3)
    scale = np.abs(full).max()
    assert scale > 0.1

    # compact ↔ full agree, through phonopy's own converter
    np.testing.assert_allclose(compact, ph.force_constants, atol=0)
    np.testing.assert_allclose(compact_fc_to_full_fc(ph.primitive, compact), full, atol=1e-12)

    # acoustic sum rule, both indices
    assert np.abs(full.sum(axis=1)).max() < 1e-10
    assert np.abs(full.sum(axis=0)).max() < 1e-10
    # index permutation Φ_ab(i, j) = Φ_ba(j, i)
    assert np.abs(full - full.transpose(1, 0, 3, 2)).max() < 1e-10

    # zero beyond the cutoff (minimum-image distances in the supercell, ASE's neighbour list)
    i, j = neighbor_list("ij", _ase(ph.supercell), model.cutoff)
    inside = np.zeros((n, n), bool)
    inside[i, j] = True
    inside[np.arange(n), np.arange(n)] = True
    assert np.abs(full[~inside]).max(initial=0.0) == 0.0
    assert np.all(np.abs(full[inside]).max(axis=(1, 2)) > 0)  # every pair within the cutoff is coupled

    # every space-group operation of the supercell: Φ(g·i, g·j) = R Φ(i, j) Rᵀ
    ops = ph.symmetry.symmetry_operations
    frac = ph.supercell.scaled_positions
    lat = ph.supercell.cell.T  # columns = lattice vectors
    worst = 0.0
    rotated_by = {}  # R Φ Rᵀ, once per distinct rotation
    for rot, trans in zip(ops["rotations"], ops["translations"]):
        perm = atom_permutation(frac, rot, trans)
        if rot.tobytes() not in rotated_by:
            r_cart = lat @ rot @ np.linalg.inv(lat)
            assert np.allclose(r_cart @ r_cart.T, np.eye(3), atol=1e-8)
            rotated_by[rot.tobytes()] = r_cart @ full @ r_cart.T
        rotated = rotated_by[rot.tobytes()]
        worst = max(worst, np.abs(full[np.ix_(perm, perm)] - rotated).max())
    assert len(ops["rotations"]) >= n // len(ph.primitive)  # at least the pure lattice translations
    assert worst < 1e-10 * max(1.0, scale), worst


def _ase(phonopy_atoms):
    from ase import Atoms

    return Atoms(phonopy_atoms.symbols, cell=phonopy_atoms.cell, scaled_positions=phonopy_atoms.scaled_positions,
                 pbc=True)


def test_basis_tensors_are_linearly_independent_and_labelled_bvk():
    """θ_k = −Φ at the element its label names (Born–von Kármán convention), for fcc Ni, 2 shells."""
    model = cached_model("Ni")
    basis = model.basis
    design = basis.tensors.reshape(basis.n_params, -1)
    assert np.linalg.matrix_rank(design) == basis.n_params
    a = NI_A
    theta = np.arange(1.0, basis.n_params + 1)
    fc = basis.pair_force_constants(theta)
    values = dict(zip(model.labels, theta))

    def block(v):
        p = np.nonzero(np.all(np.abs(basis.vectors - np.array(v) * a) < 1e-6, axis=1))[0]
        assert len(p) == 1
        return fc[p[0]]

    b1 = block([0.5, 0.5, 0.0])
    assert b1[0, 0] == pytest.approx(-values["1XX"]) and b1[1, 1] == pytest.approx(-values["1XX"])
    assert b1[2, 2] == pytest.approx(-values["1ZZ"])
    assert b1[0, 1] == pytest.approx(-values["1XY"]) and b1[1, 0] == pytest.approx(-values["1XY"])
    b2 = block([1.0, 0.0, 0.0])
    assert b2[0, 0] == pytest.approx(-values["2XX"])
    assert b2[1, 1] == pytest.approx(-values["2YY"]) and b2[2, 2] == pytest.approx(-values["2YY"])
    assert np.abs(b2 - np.diag(np.diag(b2))).max() < 1e-12
    # the on-site block follows from the sum rule
    onsite = block([0.0, 0.0, 0.0])
    others = fc[np.linalg.norm(basis.vectors, axis=1) > 1e-6].sum(axis=0)
    np.testing.assert_allclose(onsite, -others, atol=1e-12)
    # projection recovers θ
    np.testing.assert_allclose(basis.project(fc), theta, atol=1e-10)


@pytest.mark.parametrize("name, atoms, cutoff", [
    ("NaCl conventional, 3 shells", bulk("NaCl", "rocksalt", a=5.69, cubic=True), 5.0),
    ("Si primitive, 3 shells", bulk("Si", "diamond", a=5.466), 4.6),
    ("hcp Mg", bulk("Mg", "hcp", a=3.21, c=5.21), 5.0),
    ("triclinic", triclinic(), 4.0),
])
def test_every_pair_within_the_cutoff_is_in_the_basis(name, atoms, cutoff):
    """The pairs of each atom equal ASE's neighbour list (independent). Rounding fractional coordinates in the
    skewed basis supercell once missed 3 of NaCl's 8 third-shell pairs of Na: a basis that broke the crystal's
    symmetry, with frequencies up to 0.7 THz off phonopy's for the same force constants."""
    model = ForceConstantModel(atoms, cutoff=cutoff)
    primitive = model.primitive
    i, j, d = neighbor_list("ijD", primitive, cutoff)
    for kappa in range(len(primitive)):
        mine = model.basis.vectors[(model.basis.atom0 == kappa) & (np.linalg.norm(model.basis.vectors, axis=1) > 0)]
        theirs = d[i == kappa]
        assert len(mine) == len(theirs), name
        assert np.abs(np.sort(mine, axis=0) - np.sort(theirs, axis=0)).max() < 1e-8, name
