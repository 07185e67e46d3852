"""ForceConstantModel: D(q), phonopy round trips, EMT nickel, gradients and bad input.

Independent routes: phonopy's DynamicalMatrix and its frequencies, phonopy finite displacements with
ASE's EMT done in the test (conftest), torch.autograd.gradcheck (finite differences).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from phonopy import Phonopy
from phonopy.harmonic.dynamical_matrix import DynamicalMatrix
from phonopy.structure.atoms import PhonopyAtoms

from ase_tds.covariance import mesh_q
from ase_tds import ForceConstantModel, StructureError
from ase_tds.structure import diagonal_supercell_for

from conftest import BCC_128, CRYSTALS, FCC_64, FCC_PRIMITIVE_MATRIX, NI_A, cached_model, ni_conventional


def cartesian_q(q_reduced, primitive_cell):
    """q in reduced coordinates of the primitive reciprocal lattice (phonopy's) → Cartesian Å⁻¹."""
    return 2 * np.pi * np.asarray(q_reduced) @ np.linalg.inv(np.asarray(primitive_cell)).T


def site_order(model, phonopy_primitive):
    """order[k] = model's primitive atom at phonopy's primitive atom k (matched by position mod lattice)."""
    prim_cell = np.array(model.primitive.cell[:])
    frac = phonopy_primitive.positions @ np.linalg.inv(prim_cell)
    ref = model.primitive.get_scaled_positions()
    diff = frac[:, None] - ref[None]
    diff -= np.round(diff)
    dist = np.linalg.norm(diff @ prim_cell, axis=-1)
    order = np.argmin(dist, axis=1)
    assert np.all(dist.min(axis=1) < 1e-6) and len(set(order.tolist())) == len(order)
    return order


def dof_order(order):
    return (3 * np.asarray(order)[:, None] + np.arange(3)).ravel()


def phonopy_frequencies(ph, q_reduced):
    ph.run_qpoints(np.atleast_2d(q_reduced))
    return ph.qpoints.frequencies


def assert_same_frequencies(ours, theirs, rtol=1e-10):
    """Compare signed ν·|ν| (∝ eigenvalues of D): acoustic modes at Γ are √(round-off) and carry no digits."""
    ours, theirs = np.sign(ours) * ours**2, np.sign(theirs) * np.asarray(theirs) ** 2
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=rtol * np.abs(theirs).max())


# ----------------------------------------------------------------------------- D(q) against phonopy
@pytest.mark.parametrize("name", list(CRYSTALS))
def test_dynamical_matrix_matches_phonopy(name, rng):
    model = cached_model(name)
    model.set_parameters(rng.normal(size=model.n_params))
    ph = model.to_phonopy(diagonal_supercell_for(model.unitcell.cell[:], model.cutoff))
    dm = DynamicalMatrix(ph.supercell, ph.primitive, ph.force_constants, hermitianize=False)
    idx = dof_order(site_order(model, ph.primitive))

    q_red = np.vstack([np.zeros(3), rng.uniform(-1, 1, size=(7, 3))])
    q_cart = cartesian_q(q_red, ph.primitive.cell)
    ours = model.dynamical_matrix(q_cart).detach().numpy()
    assert ours.shape == (len(q_red), 3 * model.n_atoms, 3 * model.n_atoms)
    scale = np.abs(ours).max()
    # Hermitian
    assert np.abs(ours - ours.conj().transpose(0, 2, 1)).max() < 1e-12 * scale
    for q, d in zip(q_red, ours):
        dm.run(q)
        np.testing.assert_allclose(d[np.ix_(idx, idx)], dm.dynamical_matrix, rtol=0, atol=1e-10 * scale)
    # acoustic sum rule at Γ: mass-weighted rigid translations are null vectors of D(0)
    translation = np.kron(np.sqrt(model.primitive.get_masses())[:, None], np.eye(3))
    assert np.abs(ours[0] @ translation).max() < 1e-10 * scale

    # frequencies of the phonopy object (same unit conversion) equal the model's
    assert_same_frequencies(model.frequencies(q_cart), phonopy_frequencies(ph, q_red))


def test_dynamical_matrix_is_linear_and_periodic(rng):
    """D(q; θ) = Σ θ_k D(q; e_k); D(q + G) = D(q) for a reciprocal-lattice vector G of the primitive cell."""
    model = cached_model("Mg")
    theta = rng.normal(size=model.n_params)
    q = rng.normal(size=(4, 3))
    model.set_parameters(theta)
    d = model.dynamical_matrix(q).detach()
    total = torch.zeros_like(d)
    for k in range(model.n_params):
        e = np.zeros(model.n_params)
        e[k] = 1.0
        total += theta[k] * model.set_parameters(e).dynamical_matrix(q).detach()
    assert (d - total).abs().max() < 1e-12 * d.abs().max()
    model.set_parameters(theta)
    g = cartesian_q(rng.integers(-3, 4, size=(4, 3)), model.primitive.cell[:])
    # phases use atomic positions, so D(q + G) = U† D(q) U with U = diag(e^{iG·r_κ}) per atom
    u = np.repeat(np.exp(1j * (g @ model.primitive.positions.T)), 3, axis=1)  # (4, 3n)
    d_shift = model.dynamical_matrix(q + g).detach().numpy()
    expected = u.conj()[:, :, None] * d.numpy() * u[:, None, :]
    np.testing.assert_allclose(d_shift, expected, atol=1e-10 * np.abs(expected).max())


def test_q_from_hkl_matches_phonopy_primitive_reduction(rng):
    """hkl of the conventional cell → q; phonopy's reduced q of the primitive cell is hkl · P."""
    model = cached_model("Ni")
    hkl = rng.uniform(-2, 2, size=(5, 3))
    q_cart = model.q_from_hkl(hkl)
    np.testing.assert_allclose(q_cart, 2 * np.pi * hkl / NI_A, atol=1e-12)
    np.testing.assert_allclose(q_cart, cartesian_q(hkl @ FCC_PRIMITIVE_MATRIX, model.primitive.cell[:]),
                               atol=1e-12)
    np.testing.assert_allclose(model.primitive_matrix, FCC_PRIMITIVE_MATRIX, atol=1e-12)


# ----------------------------------------------------------------------------- EMT nickel
def fcc_path(points_per_segment=15):
    """Γ–X–W–L–Γ–K in hkl of the conventional cubic cell."""
    corners = np.array([[0, 0, 0], [1, 0, 0], [1, 0.5, 0], [0.5, 0.5, 0.5], [0, 0, 0], [0.75, 0.75, 0]])
    t = np.linspace(0, 1, points_per_segment, endpoint=False)[:, None]
    path = [a + t * (b - a) for a, b in zip(corners[:-1], corners[1:])]
    return np.vstack(path + [corners[-1:]])


def test_emt_ni_projection_reproduces_phonopy(ni5_model, emt_ni_phonopy):
    model = ni5_model.set_from_phonopy(emt_ni_phonopy)
    hkl = fcc_path()
    expected = phonopy_frequencies(emt_ni_phonopy, hkl @ FCC_PRIMITIVE_MATRIX)
    ours = model.frequencies(model.q_from_hkl(hkl))
    assert np.abs(ours - expected).max() <= 0.02
    assert expected.max() > 9.0  # a real dispersion (the LA branch near X/L is ~10 THz), not zeros
    away_from_gamma = np.linalg.norm(hkl, axis=1) > 1e-9
    assert np.all(ours[away_from_gamma] > 0)  # EMT Ni is stable

    # sanity of the sign convention: θ = −Φ, so the dominant nearest-neighbour spring has 1XX > 0
    values = model.parameter_dict()
    assert values["1XX"] > 5 * max(abs(v) for k, v in values.items() if not k.startswith("1"))


def test_set_from_calculator_agrees_with_phonopy_route(ni5_model, ni5_model_cached, emt_ni_phonopy):
    from ase.calculators.emt import EMT

    # a different (128-atom, body-centred) supercell than the reference's 4×4×4 conventional one
    direct = ni5_model.set_from_calculator(EMT(), supercell_matrix=BCC_128, progress=False)
    reference = copy.deepcopy(ni5_model_cached).set_from_phonopy(emt_ni_phonopy)
    np.testing.assert_allclose(direct.theta.detach().numpy(), reference.theta.detach().numpy(), atol=1e-3)
    hkl = fcc_path(5)
    expected = phonopy_frequencies(emt_ni_phonopy, hkl @ FCC_PRIMITIVE_MATRIX)
    assert np.abs(direct.frequencies(direct.q_from_hkl(hkl)) - expected).max() <= 0.02


# ----------------------------------------------------------------------------- BvK ↔ phonopy round trip
@pytest.mark.parametrize("name", ["Ni5", "Mg", "NaCl", "MgB2"])
def test_bvk_phonopy_round_trip(name, rng, ni5_model_cached, tmp_path):
    make = (lambda: copy.deepcopy(ni5_model_cached)) if name == "Ni5" else (lambda: cached_model(name))
    model = make()
    constants = {label: float(v) for label, v in zip(model.labels, rng.normal(size=model.n_params))}
    model.set_from_bvk(constants)
    assert model.parameter_dict() == constants
    ph = model.to_phonopy(BCC_128 if name == "Ni5" else diagonal_supercell_for(model.unitcell.cell[:], model.cutoff))

    back = make().set_from_phonopy(ph)
    got = back.parameter_dict()
    assert list(got) == list(constants)
    assert max(abs(got[k] - constants[k]) for k in constants) < 1e-10

    # the phonopy object's own frequencies equal the model's
    q_red = rng.uniform(-0.5, 0.5, size=(6, 3))
    assert_same_frequencies(model.frequencies(cartesian_q(q_red, ph.primitive.cell)), phonopy_frequencies(ph, q_red))

    # and through a file that phonopy.load reads
    path = tmp_path / "phonopy_params.yaml"
    ph.save(str(path), settings={"force_constants": True})
    from_file = make().set_from_phonopy(path).parameter_dict()
    assert max(abs(from_file[k] - constants[k]) for k in constants) < 1e-10


def test_set_from_bvk_missing_labels_are_zero():
    model = cached_model("Ni").set_from_bvk({"1XX": 1.5})
    assert model.parameter_dict() == {"1XX": 1.5, "1ZZ": 0.0, "1XY": 0.0, "2XX": 0.0, "2YY": 0.0}


def test_set_from_phonopy_small_supercell_is_an_image_sum(rng):
    """Finite-displacement force constants of a small supercell are sums over periodic images; the
    projection accounts for that, so folding a model's Φ onto a too-small supercell still recovers θ."""
    model = cached_model("Ni")  # 2 shells, cutoff 3.92 Å: a 2×2×2 conventional cell (7.04 Å) is too small
    theta = rng.normal(size=model.n_params)
    model.set_parameters(theta)
    big = model.to_phonopy(FCC_64)  # its lattice is a sublattice of the 2×2×2 one below
    small = Phonopy(big.unitcell, supercell_matrix=2 * np.eye(3, dtype=int), primitive_matrix=FCC_PRIMITIVE_MATRIX)
    # fold the big supercell's compact Φ onto the small one, by position modulo the small cell
    small_frac = small.supercell.scaled_positions
    folded = np.zeros((len(small.primitive), len(small.supercell), 3, 3))
    to_small = big.supercell.positions @ np.linalg.inv(small.supercell.cell)
    for j, f in enumerate(to_small):
        d = f - small_frac
        d -= np.round(d)
        folded[0, np.argmin(np.linalg.norm(d, axis=1))] += big.force_constants[0, j]
    assert np.allclose(small.supercell.positions[small.primitive.p2s_map[0]], big.supercell.positions[big.primitive.p2s_map[0]])
    small.force_constants = folded
    recovered = cached_model("Ni").set_from_phonopy(small).theta.detach().numpy()
    np.testing.assert_allclose(recovered, theta, atol=1e-10)


# ----------------------------------------------------------------------------- gradients
class _DynamicalMatrixOf(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, q):
        return self.model.dynamical_matrix(q)


@pytest.mark.parametrize("name", ["Ni", "monoclinic"])
def test_gradcheck_dynamical_matrix(name, rng):
    model = cached_model(name)
    wrapper = _DynamicalMatrixOf(model)
    q = torch.tensor(rng.normal(size=(3, 3)))
    m = 3 * model.n_atoms
    weight = torch.tensor(rng.normal(size=(m, m)) + 1j * rng.normal(size=(m, m)))

    def scalar(theta):
        d = torch.func.functional_call(wrapper, {"model.theta": theta}, (q,))
        shifted = d + 50.0 * torch.eye(m, dtype=d.dtype)  # positive definite for small θ
        logdet = 2 * torch.log(torch.diagonal(torch.linalg.cholesky(shifted), dim1=-2, dim2=-1).real).sum()
        return (torch.einsum("bij,ji->", d, weight).real + (d.abs() ** 2).sum() + logdet).reshape(1)

    theta = torch.tensor(0.3 * rng.normal(size=model.n_params), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scalar, (theta,), eps=1e-6, atol=1e-7, rtol=1e-6)
    # and the model's own parameter carries the same gradient
    model.set_parameters(theta.detach().numpy())
    model.zero_grad()
    d = model.dynamical_matrix(q)
    (d.abs() ** 2).sum().backward()
    theta2 = theta.detach().clone().requires_grad_(True)
    (torch.func.functional_call(wrapper, {"model.theta": theta2}, (q,)).abs() ** 2).sum().backward()
    torch.testing.assert_close(model.theta.grad, theta2.grad)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, kwargs, fragment",
    [
        (lambda: Atoms("Ni", positions=[[0, 0, 0]]), dict(shells=1), "periodic in all three directions"),
        (lambda: Atoms("Ni", cell=[3, 3, 3], pbc=[True, True, False]), dict(shells=1), "periodic in all three"),
        (lambda: Atoms(cell=[3, 3, 3], pbc=True), dict(shells=1), "no atoms"),
        (ni_conventional, dict(cutoff=0.0), "cutoff must be a positive length"),
        (ni_conventional, dict(cutoff=-2.0), "cutoff must be a positive length"),
        (ni_conventional, dict(cutoff=float("nan")), "cutoff must be a positive length"),
        (ni_conventional, dict(cutoff=1.0), "holds no neighbour"),
        (ni_conventional, dict(cutoff=NI_A / np.sqrt(2)), "lies on the neighbour shell"),
        (ni_conventional, dict(cutoff=NI_A), "lies on the neighbour shell"),
        (ni_conventional, dict(cutoff=100.0), "too large"),
        (ni_conventional, dict(), "exactly one of shells"),
        (ni_conventional, dict(shells=2, cutoff=3.9), "exactly one of shells"),
        (ni_conventional, dict(shells=0), "shells must be a positive integer"),
        (ni_conventional, dict(shells=1.5), "shells must be a positive integer"),
        (lambda: Atoms("Ni2", positions=[[0, 0, 0], [0, 0, 0]], cell=[3, 3, 3], pbc=True), dict(shells=1),
         "0 Å apart.*overlapping atoms"),
        (lambda: Atoms("Ni2", positions=[[0, 0, 0], [0, 0, 1e-3]], cell=[3, 3, 3], pbc=True), dict(shells=1),
         "overlapping atoms"),
        (lambda: Atoms("Ni", cell=[0.3, 3, 3], pbc=True), dict(shells=1), "overlapping atoms"),
        (lambda: Atoms("Ni2", positions=[[0, 0, 0], [0, 0, 0.6]], cell=[3, 3, 3], pbc=True),
         dict(shells=1, symprec=0.7), "spglib could not resolve the symmetry of Ni2 at symprec=0.7"),
        (ni_conventional, dict(shells=1, symprec=-1.0), "symprec must be a positive length"),
    ],
    ids=["no-pbc", "slab", "empty", "cutoff-0", "cutoff-negative", "cutoff-nan", "cutoff-below-nn",
         "cutoff-on-shell-1", "cutoff-on-shell-2", "cutoff-huge", "neither", "both", "shells-0", "shells-float",
         "overlapping-atoms", "nearly-overlapping-atoms",
         "self-overlapping-cell", "spglib-unresolved", "symprec-negative"],
)
def test_bad_structure_or_cutoff_is_refused(make, kwargs, fragment):
    with pytest.raises(StructureError, match=fragment):
        ForceConstantModel(make(), **kwargs)


def test_neighbours_closer_than_a_cutoff_can_part_are_one_shell():
    """Two neighbour distances 1.5e-3 Å apart (a = 3, b = 3.0015 Å; wurtzite ZnO has two 1.1e-3 Å apart): a cutoff
    between them is refused, so `shells=N` counts them as one shell and every N builds (the range's growth went
    through each N and stopped on such a pair)."""
    atoms = Atoms("Ni", cell=[3.0, 3.0015, 4.5], pbc=True)
    with pytest.raises(StructureError, match="lies on the neighbour shell"):
        ForceConstantModel(atoms, cutoff=3.00075)
    cutoffs = [ForceConstantModel(atoms, shells=n).cutoff for n in (1, 2)]
    assert 3.0015 + 1e-3 < cutoffs[0] < 4.24 < cutoffs[1]  # both distances in the first shell, 4.243 Å the next


def test_bad_parameters_are_refused():
    model = cached_model("Ni")
    with pytest.raises(KeyError, match=r"unknown force-constant label.*9QQ.*1XX"):
        model.set_from_bvk({"1XX": 1.0, "9QQ": 2.0})
    with pytest.raises(ValueError, match="expected 5 parameters"):
        model.set_parameters([1.0, 2.0])


def test_bad_supercells_are_refused(tmp_path, ni5_model):
    model = cached_model("Ni")  # cutoff 3.92 Å
    unitcell = PhonopyAtoms(symbols=["Ni"] * 4, cell=ni_conventional().cell[:],
                            scaled_positions=ni_conventional().get_scaled_positions())
    small = Phonopy(unitcell, supercell_matrix=2 * np.eye(3, dtype=int), primitive_matrix=FCC_PRIMITIVE_MATRIX)
    with pytest.raises(StructureError, match="too small for the cutoff"):
        model.force_constants(small, "full")
    with pytest.raises(StructureError, match="too small for the cutoff"):
        model.to_phonopy(np.eye(3, dtype=int))
    ok = model.to_phonopy(FCC_64)
    with pytest.raises(ValueError, match="layout must be 'compact' or 'full'"):
        model.force_constants(ok, "dense")
    # phonopy objects without force constants, or files that do not exist
    with pytest.raises(ValueError, match="no force constants"):
        model.set_from_phonopy(small)
    with pytest.raises(FileNotFoundError, match="no phonopy file"):
        model.set_from_phonopy(tmp_path / "missing.yaml")
    # a unit cell too small to determine 5 shells
    tiny = Phonopy(unitcell, supercell_matrix=np.eye(3, dtype=int), primitive_matrix=FCC_PRIMITIVE_MATRIX)
    tiny.force_constants = np.zeros((1, 4, 3, 3))
    with pytest.raises(StructureError, match="too small to determine"):
        ni5_model.set_from_phonopy(tiny)
    # another species on the same lattice
    cu = PhonopyAtoms(symbols=["Cu"] * 4, cell=unitcell.cell, scaled_positions=unitcell.scaled_positions)
    ph_cu = Phonopy(cu, supercell_matrix=2 * np.eye(3, dtype=int), primitive_matrix=FCC_PRIMITIVE_MATRIX)
    ph_cu.force_constants = np.zeros((1, 32, 3, 3))
    with pytest.raises(StructureError, match="species do not match"):
        model.set_from_phonopy(ph_cu)
    # another lattice altogether
    other = bulk("Ni", "bcc", a=2.8, cubic=True)
    ph_bcc = Phonopy(PhonopyAtoms(symbols=["Ni"] * 2, cell=other.cell[:], scaled_positions=other.get_scaled_positions()),
                     supercell_matrix=2 * np.eye(3, dtype=int), primitive_matrix="P")
    ph_bcc.force_constants = np.zeros((len(ph_bcc.primitive), len(ph_bcc.supercell), 3, 3))
    with pytest.raises(StructureError, match="no lattice site"):
        model.set_from_phonopy(ph_bcc)


@pytest.mark.parametrize("name", ["Ni", "NaCl", "Si", "Mg"])
def test_springs_are_exact_in_the_basis_stable_and_scaled_to_the_debye_temperature(name):
    """set_from_springs: the projection onto the symmetry basis reproduces the central springs exactly (they obey
    every isometry), every mode on a mesh is real, and ⟨ω²⟩ = (3/5) ω_D² for the requested Debye temperature."""
    from ase import units

    model = cached_model(name).set_from_springs(debye_temperature=400.0)
    pair_fc = model.basis.pair_force_constants(model.theta.detach().numpy())
    vectors = model.basis.vectors
    r = np.linalg.norm(vectors, axis=1)
    off = r > 1e-8
    unit = vectors[off] / r[off, None]
    k = -np.einsum("pab,pa,pb->p", pair_fc[off], unit, unit)  # the spring along each bond
    np.testing.assert_allclose(pair_fc[off], -k[:, None, None] * unit[:, :, None] * unit[:, None, :], atol=1e-10)
    assert np.all(k > 0)
    q = mesh_q(model, (8, 8, 8))[1:]
    assert model.frequencies(q).min() > 0
    omega2 = torch.linalg.eigvalsh(model.dynamical_matrix(q)).clamp(min=0).mean().item()
    theta_d = units._hbar * np.sqrt(5 / 3 * omega2 * units._e / (1e-20 * units._amu)) / units._k
    assert theta_d == pytest.approx(400.0, rel=1e-9)


@pytest.mark.parametrize("debye, low, high", [(700.0, 500, 900), (2500.0, 1800, 3300)])
def test_the_spring_stiffness_is_read_off_the_data(debye, low, high):
    """Data of springs at a 700 K Debye temperature: the scan picks a neighbouring candidate (566 or 800 K), where
    the default 300 K would start 5× too soft; at 2500 K, past the last candidate (1600 K), it goes on beyond it."""
    from ase_tds import simulate
    from ase_tds.fitting import debye_temperature_from_data

    truth = ForceConstantModel(ni_conventional(), shells=2).set_from_springs(debye)
    hkl = np.random.default_rng(2).uniform(-4, 4, size=(300, 3))
    data = simulate(truth, hkl[np.abs(hkl - np.round(hkl)).max(axis=1) > 0.15], 300.0, tds_options=dict(grid=(6, 6, 6)))
    model = ForceConstantModel(ni_conventional(), shells=2)
    chosen = debye_temperature_from_data(model, data)
    assert low < chosen < high
    np.testing.assert_allclose(model.theta.detach().numpy(),
                               ForceConstantModel(ni_conventional(), shells=2).set_from_springs(chosen).theta.detach().numpy())
