"""ase_tds.dipole against phonopy's own Gonze–Lee NAC (its C/Rust `DynamicalMatrixGL`), an independent route.

Two crystals: rocksalt NaCl with phonopy's example DFT force constants and BORN (basis phases e^{iG·r} = ±1),
and a 4-atom wurtzite cell with invented, charge-neutral, non-symmetric Born charges, an anisotropic ε∞ with
off-diagonal terms and a made-up spring model (phases e^{iG·r} complex), its atoms in a different order from
phonopy's primitive cell so that the position matching is exercised too.
"""

from __future__ import annotations

import types

import numpy as np
import phonopy
import pytest
import torch
from ase.build import bulk, make_supercell
from ase.geometry import find_mic
from phonopy import Phonopy
from phonopy.harmonic.dynamical_matrix import get_dynamical_matrix
from phonopy.harmonic.force_constants import compact_fc_to_full_fc
from phonopy.structure.brillouin_zone import BrillouinZone

from ase_tds.dipole import (
    BornCharges,
    atom_map,
    dipole_dynamical_matrix,
    dipole_force_constants,
    ewald_parameters,
    first_zone,
    site_index,
)
from ase_tds.structure import find_primitive, to_ase_atoms, to_phonopy_atoms
from ase_tds.units import THZ_PER_SQRT_EV_A2_AMU

from conftest import DATA

# phonopy's example/NaCl/BORN (BSD-3-Clause): factor, ε∞, Z* of Na and Cl
NACL_BORN = """14.400
2.43533967 0 0 0 2.43533967 0 0 0 2.43533967
1.08703 0 0 0 1.08703 0 0 0 1.08703
-1.08672 0 0 0 -1.08672 0 0 0 -1.08672
"""
RTOL = 1e-10


# ---------------------------------------------------------------- crystals
@pytest.fixture(scope="module")
def nacl(tmp_path_factory):
    """NaCl as phonopy loads it with its BORN, and our primitive cell and charges from the same file."""
    born_file = tmp_path_factory.mktemp("nacl") / "BORN"
    born_file.write_text(NACL_BORN)
    ph = phonopy.load(DATA / "dft" / "NaCl" / "phonopy_params.yaml", produce_fc=False, born_filename=born_file,
                      is_nac=True)
    primitive, _ = find_primitive(to_ase_atoms(ph.unitcell))
    return _crystal(ph, primitive, BornCharges.from_phonopy_born(born_file, primitive), born_file=born_file)


def _springs(ph: Phonopy, cutoff: float = 3.3) -> np.ndarray:
    """Made-up compact force constants (n_p, N, 3, 3) eV/Å²: central springs, 4 eV/Å² < 2.1 Å, 0.6 beyond."""
    sc, n = ph.supercell, len(ph.primitive)
    fc = np.zeros((n, len(sc), 3, 3))
    for i, si in enumerate(ph.primitive.p2s_map):
        vectors, dist = find_mic(sc.positions - sc.positions[si], sc.cell)
        for s in np.flatnonzero((dist > 0) & (dist < cutoff)):
            unit = vectors[s] / dist[s]
            block = (4.0 if dist[s] < 2.1 else 0.6) * np.outer(unit, unit)
            fc[i, s] -= block
            fc[i, si] += block
    return fc


@pytest.fixture(scope="module")
def wurtzite():
    """ZnO-like wurtzite, invented charges; our primitive lists the atoms in reverse order."""
    atoms = bulk("ZnO", "wurtzite", a=3.25, c=5.21, u=0.382)
    rng = np.random.default_rng(1)
    cation = np.diag([2.1, 2.1, 2.3])
    charges = np.array([cation + 0.15 * rng.normal(size=(3, 3)), cation + 0.15 * rng.normal(size=(3, 3)),
                        -cation + 0.1 * rng.normal(size=(3, 3)), np.zeros((3, 3))])
    charges[3] = -charges[:3].sum(0)  # charge neutral, not symmetric: pins row (field) vs column (displacement)
    epsilon = np.array([[3.7, 0.2, 0.05], [0.2, 3.6, 0.1], [0.05, 0.1, 3.95]])
    ph = Phonopy(to_phonopy_atoms(atoms), supercell_matrix=np.diag([3, 3, 2]), primitive_matrix=np.eye(3),
                 is_symmetry=False)  # keep the invented charges as they are (phonopy would symmetrise them)
    ph.force_constants = _springs(ph)
    ph.nac_params = {"born": charges, "dielectric": epsilon, "factor": 14.4}
    primitive = to_ase_atoms(ph.primitive)[::-1]
    return _crystal(ph, primitive, BornCharges.from_phonopy_born(ph, primitive))


def _crystal(ph: Phonopy, primitive, born: BornCharges, **extra) -> types.SimpleNamespace:
    dm = ph.dynamical_matrix
    dm.make_Gonze_nac_dataset()
    short = get_dynamical_matrix(dm.short_range_force_constants, ph.supercell, ph.primitive)
    order = atom_map(ph.primitive.positions, ph.primitive.cell, primitive, "phonopy's primitive")
    # index of phonopy's rows in ours: our row 3·order[p] + α is phonopy's 3p + α
    rows = (3 * np.argsort(order)[:, None] + np.arange(3)).ravel()
    return types.SimpleNamespace(ph=ph, dm=dm, short=short, primitive=primitive, born=born, rows=rows,
                                 rec=np.linalg.inv(ph.primitive.cell), **extra)


CRYSTALS = ["nacl", "wurtzite"]


# ---------------------------------------------------------------- helpers
def _cart(c, q_red) -> np.ndarray:
    """Cartesian q (B, 3) Å⁻¹ with 2π from phonopy's reduced q."""
    return 2 * np.pi * np.atleast_2d(q_red) @ c.rec.T


def _ours(c, q_red, q_dir_red=None) -> np.ndarray:
    """Our D_dd (B, 3n, 3n) at phonopy's reduced q, rows in phonopy's atom order."""
    direction = None if q_dir_red is None else _cart(c, q_dir_red)
    d = dipole_dynamical_matrix(_cart(c, q_red), c.primitive, c.born, q_direction=direction).numpy()
    return d[:, c.rows][:, :, c.rows]


def _phonopy_dd(c, q_red, q_dir_red=None) -> np.ndarray:
    """phonopy's own D_dd (3n, 3n) eV/Å²/amu at a q of its first zone."""
    return c.dm._get_Gonze_dipole_dipole(np.asarray(q_red, dtype=float), q_dir_red)


def _short(c, q_red) -> np.ndarray:
    """phonopy's D_short (3n, 3n) from its short-range force constants (no NAC)."""
    c.short.run(np.asarray(q_red, dtype=float))
    return c.short.dynamical_matrix


def _inner_points(c, n: int, seed: int = 0) -> np.ndarray:
    """n reduced q in the first zone, at least 5 % of |q| away from its faces (phonopy's and our zone agree)."""
    rng = np.random.default_rng(seed)
    zone = BrillouinZone(c.rec)
    zone.run(rng.uniform(-0.5, 0.5, (4 * n, 3)))
    q = np.array([points[0] for points in zone.shortest_qpoints])
    shifts = np.array(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij")).reshape(3, -1).T
    dist = np.sort(np.linalg.norm((q[:, None, :] - shifts[None]) @ c.rec.T, axis=-1), axis=1)
    return q[dist[:, 1] > 1.05 * dist[:, 0]][:n]


def _phase(c, g_red) -> np.ndarray:
    """e^{iG·(r_j − r_i)} (3n, 3n) in phonopy's atom order, G = g_red in its reciprocal basis."""
    p = np.exp(2j * np.pi * c.ph.primitive.positions @ (c.rec @ g_red))
    return np.repeat(np.repeat(np.outer(p.conj(), p), 3, 0), 3, 1)


def _relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _thz(d) -> np.ndarray:
    lam = np.linalg.eigvalsh(d)
    return np.sign(lam) * np.sqrt(np.abs(lam)) * THZ_PER_SQRT_EV_A2_AMU


# ---------------------------------------------------------------- Born charges and Ewald parameters
def test_born_file_is_read_as_phonopy_load_reads_it(nacl):
    from_phonopy = BornCharges.from_phonopy_born(nacl.ph, nacl.primitive)
    assert nacl.born.factor == from_phonopy.factor == 14.4
    np.testing.assert_allclose(nacl.born.charges, from_phonopy.charges, atol=1e-14)
    np.testing.assert_allclose(nacl.born.epsilon, from_phonopy.epsilon, atol=1e-14)
    assert abs(float(nacl.born.charge_sum.abs().max())) < 1e-12  # symmetrised to neutrality, as phonopy does
    flipped = BornCharges.from_phonopy_born(nacl.born_file, nacl.primitive[::-1], reference=nacl.ph)
    np.testing.assert_allclose(flipped.charges, nacl.born.charges.flip(0), atol=1e-14)


def test_nac_params_round_trip_through_phonopys_atom_order(wurtzite):
    params = wurtzite.born.nac_params(wurtzite.primitive, reference=wurtzite.ph)
    np.testing.assert_allclose(params["born"], wurtzite.ph.nac_params["born"], atol=1e-15)
    assert params["factor"] == 14.4


@pytest.mark.parametrize("name", CRYSTALS)
def test_g_vectors_and_lambda_are_phonopys(name, request):
    c = request.getfixturevalue(name)
    gvec, lam = ewald_parameters(c.primitive, c.born)
    ours, theirs = (np.array(sorted(map(tuple, np.round(g, 10)))) for g in (gvec, c.dm._G_list))
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert float(lam) == pytest.approx(c.dm._Lambda, rel=1e-14)


# ---------------------------------------------------------------- D_dd(q) against phonopy
@pytest.mark.parametrize("name", CRYSTALS)
def test_dipole_term_matches_phonopys_in_the_first_zone(name, request):
    c = request.getfixturevalue(name)
    q = _inner_points(c, 12)
    ours = _ours(c, q)
    for b, q_red in enumerate(q):
        assert _relative(ours[b], _phonopy_dd(c, q_red)) < RTOL
        c.dm.run(q_red)  # phonopy's total D(q) = D_short(q) + D_dd(q)
        assert _relative(_short(c, q_red) + ours[b], c.dm.dynamical_matrix) < RTOL


@pytest.mark.parametrize("name", CRYSTALS)
def test_beyond_the_first_zone_the_phase_of_the_atomic_positions_is_carried(name, request):
    c = request.getfixturevalue(name)
    q0 = _inner_points(c, 6, seed=1)
    g = np.random.default_rng(2).integers(-3, 4, (6, 3)).astype(float)
    ours = _ours(c, q0 + g)
    phases = [np.exp(2j * np.pi * c.ph.primitive.positions @ (c.rec @ gi)) for gi in g]
    if name == "wurtzite":  # the check needs phases that are not ±1
        assert max(np.abs(p.imag).max() for p in phases) > 0.5
    for b in range(len(g)):
        assert _relative(ours[b], _phonopy_dd(c, q0[b]) * _phase(c, g[b])) < RTOL


def test_phase_rule_agrees_with_phonopys_sum_over_a_larger_sphere(wurtzite):
    """Independent of the phase formula: phonopy summing around the unreduced q with enough G vectors."""
    c = wurtzite
    q0, g = _inner_points(c, 1, seed=3)[0], np.array([1.0, -2.0, 1.0])
    gvec, lam = ewald_parameters(c.primitive, c.born)
    radius = np.linalg.norm(gvec, axis=1).max() + np.linalg.norm(c.rec @ g) + 1.5
    wide = {**c.ph.nac_params, "G_cutoff": radius, "Lambda": float(lam)}
    dm = get_dynamical_matrix(c.ph.force_constants, c.ph.supercell, c.ph.primitive, nac_params=wide)
    dm.make_Gonze_nac_dataset()
    theirs = dm._get_Gonze_dipole_dipole(q0 + g, None)
    ours_wide = BornCharges(c.born.charges, c.born.epsilon, c.born.factor, g_cutoff=radius, ewald_lambda=float(lam))
    d = dipole_dynamical_matrix(_cart(c, q0 + g), c.primitive, ours_wide).numpy()[0]
    assert _relative(d[c.rows][:, c.rows], theirs) < 1e-12
    # phonopy's default sphere (the Gaussian 1e-10 at its edge) is within 1e-7 of the converged sum
    assert _relative(_ours(c, q0 + g)[0], theirs) < 1e-7


def test_nacl_outside_the_first_zone_gives_phonopys_first_zone_frequencies(nacl):
    """The README's q = (3.1, 2.05, −1): phonopy's unreduced D is wrong there; D_short + ours is not."""
    q = np.array([3.1, 2.05, -1.0])
    zone = BrillouinZone(nacl.rec)
    zone.run([q])
    q0 = zone.shortest_qpoints[0][0]
    nacl.dm.run(q0)
    reference = _thz(nacl.dm.dynamical_matrix)
    np.testing.assert_allclose(_thz(_short(nacl, q) + _ours(nacl, q)[0]), reference, atol=1e-9)
    nacl.dm.run(q)
    assert np.abs(_thz(nacl.dm.dynamical_matrix) - reference).max() > 0.1  # why q must be reduced


# ---------------------------------------------------------------- Γ: the direction-dependent limit
@pytest.mark.parametrize("name", CRYSTALS)
@pytest.mark.parametrize("direction", [[1.0, 0.0, 0.0], [0.3, -0.2, 0.7]])
def test_gamma_with_a_direction_is_phonopys(name, direction, request):
    c = request.getfixturevalue(name)
    ours = _ours(c, [0.0, 0.0, 0.0], direction)[0]
    assert _relative(ours, _phonopy_dd(c, np.zeros(3), np.array(direction))) < RTOL
    g = np.array([1.0, 1.0, -1.0])  # a reciprocal lattice vector reduces to Γ and keeps the direction
    assert _relative(_ours(c, g, direction)[0], ours * _phase(c, g)) < RTOL


@pytest.mark.parametrize("name", CRYSTALS)
def test_gamma_without_a_direction_is_the_analytic_part_as_in_phonopy(name, request):
    c = request.getfixturevalue(name)
    c.dm.run(np.zeros(3))  # phonopy without a direction: D(Γ) of the full force constants, no NAC term
    assert _relative(_short(c, np.zeros(3)) + _ours(c, np.zeros(3))[0], c.dm.dynamical_matrix) < RTOL


def test_nacl_lo_to_splitting(nacl):
    """LO ≈ 7.4 THz, TO ≈ 4.6 THz (phonopy's example) approaching Γ along x, from phonopy and from ours."""
    nacl.ph.run_qpoints([[0.0, 0.0, 0.0]], nac_q_direction=[1.0, 0.0, 0.0])
    theirs = nacl.ph.qpoints.frequencies[0]
    ours = _thz(_short(nacl, np.zeros(3)) + _ours(nacl, [0.0, 0.0, 0.0], [1.0, 0.0, 0.0])[0])
    np.testing.assert_allclose(ours, theirs, atol=1e-6)  # acoustic: √ of round-off
    np.testing.assert_allclose(ours[3:], theirs[3:], rtol=1e-10)
    assert ours[5] == pytest.approx(7.40, abs=0.05) and ours[3:5] == pytest.approx([4.62, 4.62], abs=0.05)
    approach = [_thz(_short(nacl, t * np.array([1.0, 0, 0])) + _ours(nacl, [t, 0, 0])[0]) for t in (1e-2, 1e-3, 1e-4)]
    gaps = [abs(a[5] - ours[5]) for a in approach]
    assert gaps == sorted(gaps, reverse=True)
    assert abs(approach[-1][5] - ours[5]) < 1e-4


# ---------------------------------------------------------------- gradients, dtype
def test_gradients_in_born_charges_and_epsilon(nacl):
    rng = np.random.default_rng(4)
    charges = torch.tensor(rng.normal(size=(2, 3, 3)), requires_grad=True)
    half = torch.tensor(np.diag([2.4, 2.6, 2.2]) + 0.1 * rng.normal(size=(3, 3)), requires_grad=True)
    q = torch.tensor(_cart(nacl, [[0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [1.2, 0.4, -0.9]]))
    direction = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.2], [0.0, 0.0, 0.0]])

    def dd(z, a):
        return dipole_dynamical_matrix(q, nacl.primitive, BornCharges(z, (a + a.T) / 2), q_direction=direction)

    assert torch.autograd.gradcheck(dd, (charges, half))

    def fc(z, a):
        return dipole_force_constants(np.diag([2, 2, 2]), nacl.primitive, BornCharges(z, (a + a.T) / 2))

    assert torch.autograd.gradcheck(fc, (charges, half), fast_mode=True)  # 288 outputs: random projections


def test_float32_follows_the_charges_dtype(wurtzite):
    q = _cart(wurtzite, _inner_points(wurtzite, 3))
    d64 = dipole_dynamical_matrix(q, wurtzite.primitive, wurtzite.born)
    d32 = dipole_dynamical_matrix(q, wurtzite.primitive, wurtzite.born.to(torch.float32))
    assert d32.dtype == torch.complex64 and d64.dtype == torch.complex128
    assert _relative(d32.numpy(), d64.numpy()) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(wurtzite):
    q = _cart(wurtzite, _inner_points(wurtzite, 3))
    cpu = dipole_dynamical_matrix(q, wurtzite.primitive, wurtzite.born)
    gpu = dipole_dynamical_matrix(q, wurtzite.primitive, wurtzite.born.to(device="cuda"))
    assert gpu.device.type == "cuda" and _relative(gpu.cpu().numpy(), cpu.numpy()) < 1e-12


# ---------------------------------------------------------------- supercell force constants
def test_nacl_dipole_force_constants_are_what_phonopy_subtracts(nacl):
    fc_dd = dipole_force_constants(nacl.ph, nacl.primitive, nacl.born).numpy()
    np.testing.assert_allclose(nacl.dm.short_range_force_constants + fc_dd, nacl.ph.force_constants, atol=1e-11)
    full = dipole_force_constants(nacl.ph, nacl.primitive, nacl.born, layout="full").numpy()
    np.testing.assert_allclose(full, compact_fc_to_full_fc(nacl.ph.primitive, fc_dd), atol=1e-12)
    assert np.abs(fc_dd.sum(1)).max() < 1e-12  # the acoustic sum rule of the self term


def test_phonopy_file_of_short_plus_dipole_constants_round_trips(wurtzite, tmp_path):
    """FC_short(springs) + FC_dd in a phonopy yaml: phonopy.load gives D_short + D_dd at every q."""
    c = wurtzite
    ph = Phonopy(c.ph.unitcell, supercell_matrix=c.ph.supercell_matrix, primitive_matrix=np.eye(3), is_symmetry=False)
    springs = _springs(ph)
    ph.force_constants = springs + dipole_force_constants(ph, c.primitive, c.born).numpy()
    ph.nac_params = c.born.nac_params(c.primitive, reference=ph)
    ph.save(tmp_path / "phonopy_params.yaml", settings={"force_constants": True})
    loaded = phonopy.load(tmp_path / "phonopy_params.yaml", produce_fc=False, is_nac=True, is_symmetry=False)
    plain = get_dynamical_matrix(springs, ph.supercell, ph.primitive)
    q = np.vstack([_inner_points(c, 5, seed=5), [[0.5, 0.0, 0.0], [1 / 3, 1 / 3, 0.0]]])
    ours = _ours(c, q)
    for b, q_red in enumerate(q):
        loaded.dynamical_matrix.run(q_red)
        plain.run(q_red)
        assert _relative(plain.dynamical_matrix + ours[b], loaded.dynamical_matrix.dynamical_matrix) < RTOL


def test_a_supercell_matrix_builds_phonopys_supercell(wurtzite):
    c = wurtzite
    by_matrix = dipole_force_constants(np.diag([3, 3, 2]), c.primitive, c.born).numpy()
    ph = Phonopy(to_phonopy_atoms(c.primitive), supercell_matrix=np.diag([3, 3, 2]), primitive_matrix=np.eye(3))
    np.testing.assert_allclose(by_matrix, dipole_force_constants(ph, c.primitive, c.born).numpy(), atol=1e-14)


@pytest.mark.parametrize("name, matrix", [("wurtzite", np.diag([3, 3, 2])),
                                          ("nacl", np.array([[-1, 1, 1], [1, -1, 1], [1, 1, -1]]))])
def test_an_ase_supercell_in_its_own_atom_order(name, matrix, request):
    """An ASE supercell (shuffled, non-diagonal for NaCl) gets the same constants as phonopy's, permuted."""
    c = request.getfixturevalue(name)
    atoms = make_supercell(c.primitive, matrix)
    atoms = atoms[np.random.default_rng(7).permutation(len(atoms))]
    ours = dipole_force_constants(atoms, c.primitive, c.born, layout="full").numpy()
    ph = Phonopy(to_phonopy_atoms(c.primitive), supercell_matrix=matrix.T, primitive_matrix=np.eye(3))
    theirs = dipole_force_constants(ph, c.primitive, c.born, layout="full").numpy()
    diff = atoms.get_scaled_positions()[:, None, :] - ph.supercell.scaled_positions[None]
    where = np.argmin(np.linalg.norm((diff - np.rint(diff)) @ atoms.cell[:], axis=-1), axis=1)
    np.testing.assert_allclose(ours, theirs[np.ix_(where, where)], atol=1e-12)
    compact = dipole_force_constants(atoms, c.primitive, c.born).numpy()
    sites = site_index(atoms.positions, c.primitive, "the supercell")
    first = [int(np.flatnonzero(sites == a)[0]) for a in range(len(c.primitive))]  # compact rows
    np.testing.assert_allclose(compact, ours[first], atol=1e-14)


# ---------------------------------------------------------------- zone reduction and bad input
def test_first_zone_keeps_inner_points_and_removes_lattice_vectors(wurtzite):
    c = wurtzite
    q0 = _inner_points(c, 5, seed=6) @ c.rec.T
    g = np.array([[1, 0, 0], [0, -2, 1], [3, 1, -1], [0, 0, 0], [-1, 1, 2]], dtype=float) @ c.rec.T
    k0, shift = first_zone(torch.tensor(q0 + g), c.primitive.cell[:])
    np.testing.assert_allclose(k0.numpy(), q0, atol=1e-12)
    np.testing.assert_allclose(shift.numpy(), g, atol=1e-12)


def test_bad_input_is_refused_with_a_reason(nacl, tmp_path):
    with pytest.raises(ValueError, match="positive definite"):
        BornCharges(np.zeros((2, 3, 3)), -np.eye(3))
    with pytest.raises(ValueError, match=r"\(n, 3, 3\)"):
        BornCharges(np.zeros((2, 3)), np.eye(3))
    with pytest.raises(FileNotFoundError, match="BORN"):
        BornCharges.from_phonopy_born(tmp_path / "BORN", nacl.primitive)
    (tmp_path / "BORN").write_text("14.4\n1 0 0\n")
    with pytest.raises(ValueError, match="not a BORN file"):
        BornCharges.from_phonopy_born(tmp_path / "BORN", nacl.primitive)
    plain = phonopy.load(DATA / "dft" / "NaCl" / "phonopy_params.yaml", produce_fc=False, is_nac=False)
    with pytest.raises(ValueError, match="no Born charges"):
        BornCharges.from_phonopy_born(plain, nacl.primitive)
    with pytest.raises(ValueError, match="same lattice"):
        BornCharges.from_phonopy_born(nacl.ph, bulk("NaCl", "rocksalt", a=5.0))
    with pytest.raises(ValueError, match="layout"):
        dipole_force_constants(nacl.ph, nacl.primitive, nacl.born, layout="dense")
    with pytest.raises(ValueError, match="Born charges for a primitive cell"):
        dipole_dynamical_matrix([[0.1, 0, 0]], nacl.primitive, BornCharges(np.zeros((3, 3, 3)), np.eye(3)))
