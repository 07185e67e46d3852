"""Samplers of thermal displacements and the sampling estimator of I(Q), each against an independent route.

Covariances: a supercell Hessian folded here by brute force from the model's pairs on ase's
`Atoms.repeat`, diagonalised with numpy (pseudo-inverse = centre of mass fixed; quantum: mode sums).
Intensities: the exact Var(F)/N of the same periodic supercell from that covariance, and
tds_model(method="gaussian") on it, within 4 standard errors.
Gradients: torch.autograd.gradcheck with the noise fixed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from torch.func import functional_call

from ase_tds import ForceConstantModel, tds_model
from ase_tds.sampling import DenseSampler, QSpaceSampler

from conftest import NI_A, ni_conventional

T = 300.0
KT = units.kB * T


def cu3au() -> Atoms:
    """L1₂ Cu₃Au at its EMT lattice constant: 4 atoms, masses 63.5 and 197 amu."""
    a = 3.72
    return Atoms("AuCu3", cell=[a, a, a], scaled_positions=[[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0]],
                 pbc=True)


_EMT = {"Ni conventional": ni_conventional, "Ni primitive": lambda: bulk("Ni", "fcc", a=NI_A),
        "Cu3Au": cu3au}


@pytest.fixture(scope="module")
def emt_models():
    out = {}
    for name, factory in _EMT.items():
        model = ForceConstantModel(factory(), shells=2)
        out[name] = model.set_from_calculator(EMT(), progress=False)
    return out


# ----------------------------------------------------------------------------- independent references
def brute_force_hessian(model, supercell):
    """(positions (N, 3), masses (N,), H (3N, 3N) eV/Å²) on model.unitcell.repeat(supercell), in numpy."""
    atoms = model.unitcell.repeat(supercell)
    pos, cell = atoms.positions, np.array(atoms.cell[:])
    kappa = model.site_of(pos)
    fc = model.pair_force_constants().detach().numpy()
    n = len(atoms)
    hessian = np.zeros((n, 3, n, 3))
    for i in range(n):
        for p in np.nonzero(model.basis.atom0 == kappa[i])[0]:
            frac = (pos[i] + model.basis.vectors[p] - pos) @ np.linalg.inv(cell)
            j = np.nonzero(np.abs(frac - np.round(frac)).max(axis=1) < 1e-6)[0]
            assert len(j) == 1
            hessian[i, :, j[0], :] += fc[p]
    return pos, model.masses.numpy()[kappa], hessian.reshape(3 * n, 3 * n)


def exact_covariance(model, supercell, statistics):
    """⟨u uᵀ⟩ (3N, 3N) Å² of the periodic supercell, centre of mass fixed, by numpy eigh."""
    _, masses, hessian = brute_force_hessian(model, supercell)
    inv_sqrt_m = np.repeat(1 / np.sqrt(masses), 3)
    lam, vec = np.linalg.eigh(hessian * np.outer(inv_sqrt_m, inv_sqrt_m))
    zero = np.abs(lam) < 1e-8 * lam.max()
    assert zero.sum() == 3 and lam[~zero].min() > 0  # the three translations only
    lam, vec = lam[~zero], vec[:, ~zero]
    if statistics == "classical":
        energy = np.full_like(lam, KT)
    else:  # (ħω/2)·coth(ħω/2k_BT) with ω in rad/s from λ in eV/Å²/amu
        hbar_omega = units._hbar * np.sqrt(lam * units._e / (1e-20 * units._amu)) / units._e
        energy = 0.5 * hbar_omega / np.tanh(0.5 * hbar_omega / KT)
    return (vec * (energy / lam)) @ vec.T * np.outer(inv_sqrt_m, inv_sqrt_m)


CASES = [("Ni conventional", (2, 2, 2)), ("Ni conventional", (1, 2, 3)), ("Ni primitive", (3, 2, 4)),
         ("Cu3Au", (1, 2, 3))]


# ----------------------------------------------------------------------------- the unit-cell D(q)
def test_unit_cell_dynamical_matrix_folds_the_primitive_one(emt_models, rng):
    """Conventional fcc: the 12 eigenvalues at q are the primitive ones at q + G, G ∈ {0, b1, b2, b3}."""
    model = emt_models["Ni conventional"]
    sampler = QSpaceSampler(model, (1, 1, 1), T)
    q_frac = rng.uniform(-1, 1, (6, 3))
    with torch.no_grad():
        unit = torch.linalg.eigvalsh(sampler.unit_dynamical_matrix(q_frac)).numpy()
        shifts = np.vstack([np.zeros(3), np.eye(3)])
        folded = [torch.linalg.eigvalsh(model.dynamical_matrix(model.q_from_hkl(q_frac + g))).numpy()
                  for g in shifts]
    np.testing.assert_allclose(unit, np.sort(np.concatenate(folded, axis=1), axis=1), atol=1e-10)


# ----------------------------------------------------------------------------- covariances
@pytest.mark.parametrize("name, supercell", CASES)
@pytest.mark.parametrize("sampler_class", [DenseSampler, QSpaceSampler])
def test_samplers_draw_the_exact_supercell_covariance(emt_models, name, supercell, sampler_class):
    model = emt_models[name]
    sampler = sampler_class(model, supercell, T)
    atoms = model.unitcell.repeat(supercell)
    np.testing.assert_allclose(sampler.positions, atoms.positions, atol=1e-12)
    assert sampler.symbols == atoms.get_chemical_symbols()
    exact = exact_covariance(model, supercell, "classical")
    n = sampler.n_atoms
    masses = atoms.get_masses()

    # the linear map z → u applied to the identity: its covariance exactly
    with torch.no_grad():
        a = sampler.displacements(torch.eye(3 * n, dtype=torch.float64).reshape(3 * n, n, 3))
    a = a.reshape(3 * n, 3 * n).numpy()
    np.testing.assert_allclose(a.T @ a, exact, atol=1e-12 * np.abs(exact).max())
    msd = sampler.mean_square_displacement().detach().numpy()
    diagonal = exact.reshape(n, 3, n, 3)[np.arange(n), :, np.arange(n), :]
    np.testing.assert_allclose(np.tile(msd, (sampler.n_cells, 1, 1)), diagonal, atol=1e-12 * np.abs(exact).max())

    # samples: empirical covariance within its sampling error, centre of mass fixed in each
    n_samples = 20000
    with torch.no_grad():
        u = sampler.sample(n_samples, torch.Generator().manual_seed(7)).numpy()
    assert u.shape == (n_samples, n, 3)
    com = np.einsum("j,sja->sa", masses, u) / masses.sum()
    assert np.abs(com).max() < 1e-12 * np.abs(u).max()
    flat = u.reshape(n_samples, -1)
    empirical = flat.T @ flat / n_samples
    sigma = np.sqrt((np.outer(np.diag(exact), np.diag(exact)) + exact**2) / n_samples)
    assert np.abs(empirical - exact).max() < 5.5 * sigma.max()
    assert np.max(np.abs(empirical - exact) / sigma) < 5.5


@pytest.mark.parametrize("name, supercell", [("Ni conventional", (2, 2, 2)), ("Cu3Au", (1, 2, 3))])
def test_quantum_qspace_sampler_draws_the_exact_quantum_covariance(emt_models, name, supercell):
    model = emt_models[name]
    sampler = QSpaceSampler(model, supercell, T, statistics="quantum")
    exact = exact_covariance(model, supercell, "quantum")
    n = sampler.n_atoms
    with torch.no_grad():
        a = sampler.displacements(torch.eye(3 * n, dtype=torch.float64).reshape(3 * n, n, 3))
        u = sampler.sample(20000, torch.Generator().manual_seed(3)).reshape(20000, -1).numpy()
    a = a.reshape(3 * n, 3 * n).numpy()
    np.testing.assert_allclose(a.T @ a, exact, atol=1e-12 * np.abs(exact).max())
    # quantum > classical (zero-point motion): the test would notice classical statistics slipping in
    assert np.trace(exact) > 1.01 * np.trace(exact_covariance(model, supercell, "classical"))
    sigma = np.sqrt((np.outer(np.diag(exact), np.diag(exact)) + exact**2) / len(u))
    assert np.max(np.abs(u.T @ u / len(u) - exact) / sigma) < 5.5


def test_dense_sampler_refuses_quantum_statistics(emt_models):
    with pytest.raises(ValueError, match="QSpaceSampler"):
        DenseSampler(emt_models["Ni primitive"], (2, 2, 2), T, statistics="quantum")


# ----------------------------------------------------------------------------- intensities
def brute_force_intensity(model, supercell, statistics, q, form):
    """Var(F)/N (B,) e.u. = (1/N) Σ_jj' A_j A_j'* (e^{Q·C_jj'·Q} − 1), A_j = f_j e^{−W_j} e^{iQ·R_j}, in numpy."""
    pos, _, _ = brute_force_hessian(model, supercell)
    n = len(pos)
    cov = exact_covariance(model, supercell, statistics).reshape(n, 3, n, 3)
    x = np.einsum("ba,iajc,bc->bij", q, cov, q)
    amp = form[:, model.site_of(pos)] * np.exp(-0.5 * np.einsum("bii->bi", x) + 1j * q @ pos.T)
    return np.einsum("bi,bij,bj->b", amp, np.expm1(x), amp.conj()).real / n


INTENSITY_CASES = [
    # name, supercell (= the gaussian grid: unit cell = primitive cell), hkl in its r.l.u. (on the lattice)
    ("Ni primitive", (4, 4, 4), [[0.25, 0, 0], [0.5, 0.25, 0], [0.75, 0.5, 0.25], [1.25, 0.5, 0.75],
                                 [2.5, 1.75, 0.5], [1, 1, 1], [3.25, 2, -1.5]]),
    # with the superstructure Bragg points 100 and 110 (f_Au − f_Cu), where the Γ modes carry phases
    ("Cu3Au", (2, 2, 2), [[0.5, 0, 0], [1.5, 0.5, 0], [2.5, 1.5, 0.5], [3.5, 2, 1], [1, 0, 0], [1, 1, 0]]),
]


@pytest.mark.parametrize("name, supercell, hkl", INTENSITY_CASES)
@pytest.mark.parametrize("sampler_class, statistics", [(DenseSampler, "classical"), (QSpaceSampler, "classical"),
                                                       (QSpaceSampler, "quantum")])
def test_sampling_intensity_matches_gaussian_on_the_same_supercell(emt_models, name, supercell, hkl,
                                                                   sampler_class, statistics):
    model = emt_models[name]
    assert len(model.unitcell) == model.n_atoms  # the supercell is then a grid of primitive cells
    q = torch.as_tensor(model.q_from_hkl(hkl))
    sampler = sampler_class(model, supercell, T, statistics, n_samples=1500, seed=11, progress=False)
    tds = tds_model(model, T, method="sampling", statistics=statistics, sampler=sampler)
    gaussian = tds_model(model, T, method="gaussian", statistics=statistics, grid=supercell, refine=False)
    with torch.no_grad():
        mean, stderr = tds.intensity(q)
        np.testing.assert_allclose(tds(q).numpy(), mean.numpy(), rtol=1e-12)  # seed: the same noise
        reference = gaussian(q).numpy()
        form = tds.form_factors(torch.linalg.norm(q, dim=-1)).numpy()
    mean, stderr = mean.numpy(), stderr.numpy()
    assert np.all(stderr > 0)
    exact = brute_force_intensity(model, supercell, statistics, q.numpy(), form)
    assert np.all(np.abs(mean - exact) < 4 * stderr), (mean - exact) / stderr
    # at Q = G ≠ 0 of a multi-atom cell the translations carry phases e^{−iG·r_κ} (Cu3Au 100, 110)
    np.testing.assert_allclose(reference, exact, rtol=1e-7)
    assert np.all(np.abs(mean - reference) < 4 * stderr)


def test_q_off_the_supercell_lattice_is_refused(emt_models):
    model = emt_models["Ni conventional"]
    sampler = QSpaceSampler(model, (2, 2, 2), T, progress=False)
    tds = tds_model(model, T, method="sampling", statistics="classical", sampler=sampler)
    q = model.q_from_hkl([[0.5, 0, 0], [1, 0.25, 0]])
    with pytest.raises(ValueError, match=r"Q\[1\].*not on the reciprocal lattice of the 2×2×2 supercell"):
        tds(q)
    with pytest.raises(ValueError, match="one temperature and statistics"):
        tds_model(model, 500.0, method="sampling", statistics="classical", sampler=sampler)


def test_distinct_q_counts_q_modulo_the_reciprocal_lattice(emt_models):
    """½00, 3/2 00, −½00 and 1½0 share q (mod G of the conventional cell); 0¼0, 2 1¼ 1 and 0¾0 (= −q) another;
    0 ¼ ½ a third."""
    model = emt_models["Ni conventional"]
    sampler = QSpaceSampler(model, (2, 4, 2), T, progress=False)
    q = model.q_from_hkl([[0.5, 0, 0], [1.5, 0, 0], [-0.5, 0, 0], [0.5, 1, 0], [0, 0.25, 0], [2, 1.25, 1],
                          [0, 0.75, 0]])
    assert sampler.distinct_q(q) == 2
    assert sampler.distinct_q(np.vstack([q, model.q_from_hkl([[0, 0.25, 0.5]])])) == 3


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("sampler_class, statistics", [(DenseSampler, "classical"), (QSpaceSampler, "classical"),
                                                       (QSpaceSampler, "quantum")])
def test_reparameterisation_gradient(emt_models, sampler_class, statistics):
    """gradcheck of Σ_Q I(Q) w.r.t. θ, fixed noise, conventional Ni 1×1×2 (Γ, Nyquist plane, 4-atom unit)."""
    model = emt_models["Ni conventional"]
    sampler = sampler_class(model, (1, 1, 2), T, statistics, n_samples=3, seed=5, progress=False)
    tds = tds_model(model, T, method="sampling", statistics=statistics, sampler=sampler)
    q = torch.as_tensor(model.q_from_hkl([[1, 0, 0.5], [2, 1, 1.5], [1, 1, 1], [0, 3, 2.5]]))
    theta = model.theta.detach().clone().requires_grad_(True)

    def total(theta):
        return functional_call(tds, {"force_constants.theta": theta}, (q,)).sum()

    assert torch.autograd.gradcheck(total, (theta,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_commensurate_supercell_is_the_smallest_that_sees_every_q():
    """Points on a quarter grid need L = 4 along each axis (or more when the cutoff needs it); the sampler built on
    that supercell accepts every point, and one on a smaller one refuses them."""
    from ase_tds import ForceConstantModel, QSpaceSampler
    from ase_tds.forward import points_in_sphere
    from ase_tds.sampling import commensurate_supercell

    from conftest import ni_conventional

    model = ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.5, "1XY": 1.6})
    hkl = np.round(points_in_sphere(model, 40, q_max=6.0, rng=0) * 4) / 4
    assert np.linalg.norm(model.q_from_hkl(hkl), axis=1).max() <= 6.0 + np.sqrt(3) * 0.125 * 1.8
    q = model.q_from_hkl(hkl)
    supercell = commensurate_supercell(model, q)
    assert supercell == (4, 4, 4)
    QSpaceSampler(model, supercell, 300.0).check_q(q)
    with pytest.raises(ValueError, match="not on the reciprocal lattice"):
        QSpaceSampler(model, (2, 2, 2), 300.0).check_q(q)
    with pytest.raises(ValueError, match="not multiples of 1/L"):
        commensurate_supercell(model, model.q_from_hkl([[0.1234567, 0, 0]]), max_repeat=8)
