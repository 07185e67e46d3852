"""Polar crystals in the forward models: the dipole–dipole term of Born charges in D(q), the covariance at Γ, the
phonopy files written with `nac_params`, and fitted Born charges — each against phonopy (an independent route)."""

from __future__ import annotations

import copy

import numpy as np
import phonopy
import pytest
import torch
from ase.build import bulk

from ase_tds import ForceConstantModel, PhonopyForceConstants, tds_model
from ase_tds.dipole import BornCharges, first_zone
from ase_tds.io.phonopy import write_phonopy_files
from ase_tds.units import KB, THZ_PER_SQRT_EV_A2_AMU

from conftest import DATA

NACL = DATA / "dft" / "NaCl"
FORM = {"Na": 11.0, "Cl": 17.0}  # constant form factors: the comparison is about D(q), not f(|Q|)


@pytest.fixture(scope="module")
def nacl():
    """phonopy's NaCl with its BORN (dipole correction on), and the same as a PhonopyForceConstants."""
    ph = phonopy.load(NACL / "phonopy_params.yaml", produce_fc=False, born_filename=NACL / "BORN", is_nac=True,
                      log_level=0)
    return ph, PhonopyForceConstants(ph)


@pytest.fixture(scope="module")
def polar_model():
    """Rocksalt NaCl, 3 shells of springs with Born charges (invented values, Z* = ±1.1, ε∞ = 2.4)."""
    model = ForceConstantModel(bulk("NaCl", "rocksalt", a=5.64), shells=3).set_from_springs(300.0)
    charges = np.array([np.eye(3) * 1.1, -np.eye(3) * 1.1])
    if model.primitive.get_chemical_symbols()[0] != "Na":
        charges = charges[::-1]
    return model.set_born(BornCharges(charges, 2.4 * np.eye(3)))


def test_one_phonon_intensity_is_phonopys_eigen_solution(nacl, rng):
    """I₁(Q) of NaCl with its Born charges equals v†C̃(Q)v from phonopy's eigenvectors with its dipole correction,
    C̃ = k_BT Σ_ν e_ν e_ν†/ω_ν² at q₀ in the first zone, carried to Q = q₀ + G by e^{iG·(r_j − r_i)}."""
    ph, source = nacl
    q = source.q_from_hkl(rng.uniform(-3, 3, size=(25, 3)))
    tds = tds_model(source, 300.0, method="one-phonon", statistics="classical", form_factors=FORM)
    with torch.no_grad():
        ours = tds(q).numpy()
        msd = tds.mean_square_displacement().numpy()
    k0, g = (x.numpy() for x in first_zone(torch.as_tensor(q) / (2 * np.pi), ph.primitive.cell))
    recip = np.linalg.inv(ph.primitive.cell)
    ph.run_qpoints(k0 @ ph.primitive.cell.T, with_eigenvectors=True)  # reduced coordinates of k₀
    positions, masses = ph.primitive.positions, ph.primitive.masses
    f = np.array([FORM[s] for s in ph.primitive.symbols])
    reference = []
    for i, big_q in enumerate(q):
        omega2 = (ph.qpoints.frequencies[i] / THZ_PER_SQRT_EV_A2_AMU) ** 2
        vec = ph.qpoints.eigenvectors[i]
        phase = np.repeat(np.exp(2j * np.pi * positions @ g[i]), 3)
        inverse = (vec / omega2) @ vec.conj().T * phase.conj()[:, None] * phase[None, :]
        amplitude = f * np.exp(-0.5 * np.einsum("a,kab,b->k", big_q, msd, big_q))
        v = ((amplitude / np.sqrt(masses))[:, None] * big_q[None, :]).ravel()
        reference.append(KB * 300.0 * np.real(v.conj() @ inverse @ v) / len(masses))
    assert recip is not None
    np.testing.assert_allclose(ours, reference, rtol=1e-9)


def test_the_dipole_term_changes_the_intensity(nacl, rng):
    """Without the Born charges the same force constants scatter differently (LO pushed up: less intensity)."""
    ph, source = nacl
    bare = PhonopyForceConstants(phonopy.load(NACL / "phonopy_params.yaml", produce_fc=False, is_nac=False,
                                              log_level=0))
    q = source.q_from_hkl(rng.uniform(-3, 3, size=(40, 3)))
    with torch.no_grad():
        polar, plain = (tds_model(s, 300.0, method="one-phonon", dw_mesh=4, form_factors=FORM)(q).numpy()
                        for s in (source, bare))
    assert np.abs(polar / plain - 1).max() > 0.02


def test_gamma_is_the_average_over_directions_of_approach(polar_model):
    """At Γ (a mesh's Γ cell) the covariance is averaged over the directions of approach. For rocksalt with isotropic
    charges, along d the optical modes are one LO (along d) and two TO: M^{1/2}C̃M^{1/2} = k_BT[d dᵀ/λ_LO + (1 − d dᵀ)/λ_TO]
    on the optical subspace, whose average over directions is k_BT(1/3λ_LO + 2/3λ_TO) times the identity there
    (λ = ω², eV/Å²/amu, from D(q) just off Γ, where it needs no direction)."""
    tds = tds_model(polar_model, 300.0, method="one-phonon", statistics="classical")
    with torch.no_grad():
        at_gamma = tds.covariance.mass_weighted(torch.zeros(1, 3, dtype=torch.float64))[0]
        near = torch.linalg.eigvalsh(polar_model.dynamical_matrix([[1e-4, 0, 0]]))[0]
    to, lo = near[3].item(), near[5].item()
    assert near[4].item() == pytest.approx(to) and lo > 1.5 * to  # LO–TO split
    expected = KB * 300.0 * (1 / (3 * lo) + 2 / (3 * to))
    optical = torch.linalg.eigvalsh(at_gamma)[3:].numpy()  # the three translations are removed (zero)
    np.testing.assert_allclose(optical, expected, rtol=1e-6)


def test_phonopy_files_carry_the_born_charges(polar_model, tmp_path):
    """The files written for a polar model load in phonopy with their dipole correction (nac_params) and give the
    model's frequencies, LO–TO splitting near Γ included."""
    write_phonopy_files(polar_model, tmp_path)
    ph = phonopy.load(tmp_path / "phonopy_params.yaml", log_level=0)
    assert ph.nac_params is not None
    cell = polar_model.primitive.cell[:]
    reduced = np.vstack([[[1e-3, 0, 0], [0, 0, 1e-3]], np.random.default_rng(2).uniform(-0.45, 0.45, (10, 3))])
    ph.run_qpoints(reduced)
    ours = polar_model.frequencies(reduced @ (2 * np.pi * np.linalg.inv(cell).T))
    np.testing.assert_allclose(ours, ph.qpoints.frequencies, atol=1e-6)
    assert ours[0, -1] - ours[0, -2] > 0.5  # LO above TO near Γ
    # read back as a start (`--start phonopy_params.yaml`): the Born charges and the short-range θ as written
    back = ForceConstantModel(polar_model.unitcell, shells=3).set_from_phonopy(tmp_path / "phonopy_params.yaml")
    np.testing.assert_allclose(back.born.charges.numpy(), polar_model.born.charges.numpy(), atol=1e-12)
    np.testing.assert_allclose(back.theta.detach().numpy(), polar_model.theta.detach().numpy(), atol=1e-7)


def test_fitted_born_charges_are_parameters_with_gradients(polar_model, rng):
    """set_born(fit=True): θ gains Z*(Na)xx (neutral, cubic: one charge) started at the given value, ε∞ stays fixed;
    the intensity's gradient in all of θ matches finite differences (gradcheck, float64), near Γ too."""
    model = copy.deepcopy(polar_model).set_born(polar_model.born, fit=True)
    assert model.labels[-1:] == ["Z*(Na)xx"] and model.n_params == polar_model.n_params + 1
    np.testing.assert_allclose(model.theta.detach().numpy()[-1:], [1.1])
    born = model.born_charges()
    np.testing.assert_allclose(born.charges.sum(0).detach().numpy(), 0, atol=1e-14)
    np.testing.assert_allclose(born.epsilon.numpy(), 2.4 * np.eye(3))
    tds = tds_model(model, 300.0, method="one-phonon", statistics="quantum", dw_mesh=1, form_factors=FORM)
    q = torch.as_tensor(model.q_from_hkl([[0.3, 1.2, 2.1], [2.02, 0, 0]]))
    theta = model.theta.detach().clone().requires_grad_(True)

    def intensity(theta):
        return torch.func.functional_call(tds, {"force_constants.theta": theta}, (q,))

    assert torch.autograd.gradcheck(intensity, (theta,), eps=1e-6, atol=1e-8, rtol=1e-5)


def test_a_model_started_at_fitted_charges_keeps_their_values(polar_model):
    """The range grows a fit of charges into the next model by its fitted Z* (functions of θ): the new model keeps
    their values, not θ's graph, so it can be copied (the CLI's save) and fitted on its own."""
    fitted = copy.deepcopy(polar_model).set_born(polar_model.born, fit=True)
    grown = ForceConstantModel(polar_model.unitcell, shells=4).set_born(fitted.born_charges(), fit=True)
    assert not grown.born.charges.requires_grad and grown.born.charges.grad_fn is None
    np.testing.assert_allclose(grown.born_charges().charges.detach().numpy(), fitted.born_charges().charges.detach())
    copy.deepcopy(grown)


def test_a_phonopy_start_gives_fitted_charges_its_own(polar_model, tmp_path):
    """`--start fitted/phonopy_params.yaml --fit-born` (a fit continued): its short range is split with the file's
    charges, so the fitted charges start at the file's, whatever start they were given; D(q) is the file's."""
    write_phonopy_files(polar_model, tmp_path)  # Z*(Na) = 1.1
    other = BornCharges(0.7 * polar_model.born.charges, polar_model.born.epsilon)
    model = ForceConstantModel(polar_model.unitcell, shells=3).set_born(other, fit=True)
    model.set_from_phonopy(tmp_path / "phonopy_params.yaml")
    assert model.theta.detach().numpy()[-1] == pytest.approx(1.1, abs=1e-10)
    q = torch.as_tensor(model.q_from_hkl([[0.3, 1.2, 2.1], [0.5, 0.5, 0.5]]))
    np.testing.assert_allclose(model.dynamical_matrix(q).detach().numpy(), polar_model.dynamical_matrix(q).detach().numpy(),
                               atol=1e-7)


def test_fitted_charges_reuse_the_ewald_sum(polar_model, monkeypatch):
    """At fixed ε∞ the sum over G is kept once per q: a new Z*, or another model of the crystal (the range's next
    candidate), adds no cache entry, and D_dd at the new Z* equals phonopy's term computed afresh
    (`dipole_dynamical_matrix` without the cache), off Γ and along a direction at Γ; another cell adds one."""
    import collections

    import ase_tds.source
    from ase_tds.dipole import dipole_dynamical_matrix

    monkeypatch.setattr(ase_tds.source, "_DIPOLE_KERNELS", collections.OrderedDict())  # not the other tests' entries
    model = copy.deepcopy(polar_model).set_born(polar_model.born, fit=True)
    q = torch.as_tensor(model.q_from_hkl([[0.3, 1.2, 2.1], [0.0, 0.0, 0.0]]))
    direction = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.4, 0.2]])
    model.dipole_matrix(q, direction)
    entries = len(ase_tds.source._DIPOLE_KERNELS)
    with torch.no_grad():
        model.theta[-1] = 1.7
    cached = model.dipole_matrix(q, direction)
    ForceConstantModel(polar_model.unitcell, shells=1).set_born(polar_model.born).dipole_matrix(q, direction)
    assert len(ase_tds.source._DIPOLE_KERNELS) == entries
    strained = polar_model.unitcell.copy()
    strained.set_cell(strained.cell[:] * 1.01, scale_atoms=True)
    ForceConstantModel(strained, shells=1).set_born(polar_model.born).dipole_matrix(q, direction)
    assert len(ase_tds.source._DIPOLE_KERNELS) == entries + 1
    fresh = BornCharges(model.born_charges().charges.detach(), model.born.epsilon)
    assert fresh.charges[0, 0, 0] == pytest.approx(1.7)
    np.testing.assert_allclose(cached.detach().numpy(), dipole_dynamical_matrix(
        q, model.primitive, fresh, direction, model.masses).numpy(), rtol=1e-12, atol=1e-14)


def test_the_calculator_carries_the_dipole_forces(polar_model, rng):
    """TDSFitted of a polar model: its forces on a displaced 2×2×2 supercell are −Φu with Φ phonopy's force
    constants of the written files (short range plus phonopy's dipole part), from phonopy's own supercell."""
    from ase_tds import TDSFitted

    ph = polar_model.to_phonopy(np.diag([2, 2, 2]) * 2)  # conventional → 4×4×4 conventional, holds the cutoff
    fc = ph.force_constants
    from phonopy.harmonic.force_constants import compact_fc_to_full_fc

    full = compact_fc_to_full_fc(ph.primitive, fc)
    sc = ph.supercell
    from ase import Atoms

    atoms = Atoms(sc.symbols, positions=sc.positions, cell=sc.cell, pbc=True)
    u = 0.02 * rng.normal(size=(len(atoms), 3))
    atoms.positions += u
    atoms.calc = TDSFitted(polar_model)
    expected = -np.einsum("iajb,jb->ia", full.transpose(0, 2, 1, 3), u)
    np.testing.assert_allclose(atoms.get_forces(), expected, atol=1e-9)
    without = copy.deepcopy(polar_model).set_born(None)
    atoms.calc = TDSFitted(without)
    assert np.abs(atoms.get_forces() - expected).max() > 1e-3


def test_the_dense_sampler_draws_with_the_dipole_forces(polar_model):
    """DenseSampler's Hessian of a polar model is the calculator's (short range plus the supercell's dipole–dipole
    force constants), so it draws from the Hessian of that periodic supercell; QSpaceSampler draws the same ⟨u uᵀ⟩
    (tests/test_sampling_polar.py checks it further)."""
    from ase import Atoms

    from ase_tds import DenseSampler, QSpaceSampler, TDSFitted

    sampler = DenseSampler(polar_model, (2, 2, 2), 300.0, seed=0, progress=False)
    atoms = Atoms(sampler.symbols, positions=sampler.positions, cell=sampler.cell, pbc=True)
    calc = TDSFitted(polar_model)
    u = 1e-3 * np.random.default_rng(0).normal(size=(len(atoms), 3))
    atoms.positions += u
    atoms.calc = calc
    with torch.no_grad():
        hessian = sampler.hessian().numpy()
    np.testing.assert_allclose(-hessian @ u.ravel(), atoms.get_forces().ravel(), atol=1e-10)
    with torch.no_grad():
        msd = sampler.mean_square_displacement().numpy()
        qspace = QSpaceSampler(polar_model, (2, 2, 2), 300.0).mean_square_displacement().numpy()
    np.testing.assert_allclose(qspace, msd, atol=1e-12 * np.abs(msd).max())


@pytest.mark.parametrize("statistics", ["classical", "quantum"])
def test_all_orders_equal_the_independent_reference_with_the_dipole_correction(nacl, statistics):
    """The gaussian model of NaCl with its Born charges on a 6³ periodic crystal equals `reference_tds` (numpy and
    phonopy's eigen-solver with its dipole correction, q reduced to the first zone, Γ averaged over directions) at Q
    on that crystal's reciprocal lattice."""
    import reference_tds as ref

    ph, source = nacl
    mesh = (6, 6, 6)
    q = ref.commensurate_points(ph.primitive.cell, mesh, 20, 6.0, np.random.default_rng(0))
    expected = ref.periodic_crystal_intensity(ph, q, mesh, 300.0, statistics)
    with torch.no_grad():
        ours = tds_model(source, 300.0, method="gaussian", statistics=statistics, grid=mesh, refine=False)(q).numpy()
    np.testing.assert_allclose(ours, expected, rtol=2e-6)
