"""The q-space sampler of a polar crystal (Born charges) against the dense one and independent routes.

NaCl with phonopy's BORN (tests/data/dft/NaCl) on its conventional cell (4 primitive cells per unit cell), springs
for the short range. References: DenseSampler's Hessian (short range plus `dipole_force_constants`, phonopy's FC_dd
of the periodic supercell) folded here onto the unit cell's q grid; the primitive cell's D(q)
(`dipole_dynamical_matrix`, checked against phonopy in test_dipole.py) at q + g; numpy eigen-decompositions of that
Hessian; gradcheck.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from torch.func import functional_call

from ase_tds import ForceConstantModel, tds_model
from ase_tds.dipole import BornCharges
from ase_tds.sampling import DenseSampler, QSpaceSampler

from conftest import DATA

T = 300.0
SUPERCELL = (2, 2, 3)  # an even and an odd repetition: zone-face q, and q whose −q the half grid holds


@pytest.fixture(scope="module")
def nacl_conventional():
    """Conventional rocksalt NaCl (8 atoms), 2 shells of springs, phonopy's BORN charges and ε∞."""
    model = ForceConstantModel(bulk("NaCl", "rocksalt", a=5.64, cubic=True), shells=2).set_from_springs(300.0)
    assert len(model.unitcell) == 4 * model.n_atoms
    return model.set_born(BornCharges.from_phonopy_born(DATA / "dft" / "NaCl" / "BORN", model.primitive))


def grid(supercell) -> np.ndarray:
    """Every q (L1·L2·L3, 3) of the supercell's grid, r.l.u. of the unit cell, C order like the cells."""
    cells = np.stack(np.meshgrid(*map(np.arange, supercell), indexing="ij"), -1).reshape(-1, 3)
    return cells / np.array(supercell)


def folded_hessian(sampler: DenseSampler, q_frac) -> np.ndarray:
    """D_ab(q) = Σ_n H(a0, bn) e^{iq·n·A}/√(m_a m_b) (B, 3n_unit, 3n_unit) from the dense Hessian, in numpy."""
    n_unit = len(sampler.unit_sites)
    with torch.no_grad():
        rows = sampler.hessian().numpy()[:3 * n_unit].reshape(n_unit, 3, sampler.n_cells, n_unit, 3)
        masses = sampler._unit_masses().numpy()
    cells = grid(sampler.supercell) * np.array(sampler.supercell)
    fold = np.einsum("aicbj,qc->qaibj", rows, np.exp(2j * np.pi * np.asarray(q_frac) @ cells.T))
    fold /= np.sqrt(np.outer(masses, masses))[None, :, None, :, None]
    return fold.reshape(len(q_frac), 3 * n_unit, 3 * n_unit)


def test_unit_cell_dynamical_matrix_is_the_dense_hessian_folded(nacl_conventional):
    """At every q of the 2×2×3 grid the unit cell's D(q) with the dipole term is the fold of DenseSampler's Hessian (to
    round-off), and its eigenvalues are the primitive cell's D(q + g) over the 4 g of the conventional cell (to the
    ~4e-8 of the largest entry at which phonopy's first-zone representative matters, at the W points)."""
    model = nacl_conventional
    q_frac = grid(SUPERCELL)
    qspace = QSpaceSampler(model, SUPERCELL, T)
    with torch.no_grad():
        ours = qspace.unit_dynamical_matrix(q_frac).numpy()
    reference = folded_hessian(DenseSampler(model, SUPERCELL, T), q_frac)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, atol=1e-12 * scale)
    with torch.no_grad():
        dipole = qspace.unit_dipole_matrix()
        shifts = np.vstack([np.zeros(3), np.eye(3)])
        primitive = [torch.linalg.eigvalsh(model.dynamical_matrix(model.q_from_hkl(q_frac + g))).numpy()
                     for g in shifts]
    unfolded = np.sort(np.concatenate(primitive, axis=1), axis=1)
    np.testing.assert_allclose(np.linalg.eigvalsh(ours), unfolded, rtol=0, atol=1e-7 * scale)
    assert np.abs(dipole.numpy()).max() > 0.1 * scale  # the dipole term is there, and large
    with pytest.raises(ValueError, match="grid"):
        qspace.unit_dynamical_matrix([[0.25, 0, 0]])


def exact_covariance(hessian, masses, energy):
    """⟨u uᵀ⟩ (3N, 3N) Å² = M^{-1/2} Σ_ν e_ν e_νᵀ E(λ_ν)/λ_ν M^{-1/2} over the modes but the three translations."""
    inv_sqrt_m = np.repeat(1 / np.sqrt(masses), 3)
    lam, vec = np.linalg.eigh(hessian * np.outer(inv_sqrt_m, inv_sqrt_m))
    zero = np.abs(lam) < 1e-8 * lam.max()
    assert zero.sum() == 3 and lam[~zero].min() > 0
    lam, vec = lam[~zero], vec[:, ~zero]
    return (vec * (energy(lam) / lam)) @ vec.T * np.outer(inv_sqrt_m, inv_sqrt_m)


def quantum_energy(temperature):
    """E(λ) = (ħω/2) coth(ħω/2k_BT) eV for λ = ω² in eV/Å²/amu."""
    def energy(lam):
        hbar_omega = units._hbar * np.sqrt(lam * units._e / (1e-20 * units._amu)) / units._e
        return 0.5 * hbar_omega / np.tanh(0.5 * hbar_omega / (units.kB * temperature))
    return energy


def covariance_of(sampler) -> np.ndarray:
    """The covariance (3N, 3N) Å² of the linear map z → u, applied to the identity."""
    n = sampler.n_atoms
    with torch.no_grad():
        a = sampler.displacements(torch.eye(3 * n, dtype=torch.float64).reshape(3 * n, n, 3))
    a = a.reshape(3 * n, 3 * n).numpy()
    return a.T @ a


def test_both_samplers_draw_one_classical_distribution(nacl_conventional):
    """The full displacement covariance and ⟨u uᵀ⟩ of the two samplers agree, and equal k_BT H⁺ (numpy)."""
    dense = DenseSampler(nacl_conventional, SUPERCELL, T)
    qspace = QSpaceSampler(nacl_conventional, SUPERCELL, T)
    with torch.no_grad():
        hessian = dense.hessian().numpy()
        masses = dense._masses().numpy()
        msd_dense, msd_qspace = dense.mean_square_displacement().numpy(), qspace.mean_square_displacement().numpy()
    exact = exact_covariance(hessian, masses, lambda lam: np.full_like(lam, units.kB * T))
    scale = np.abs(exact).max()
    np.testing.assert_allclose(covariance_of(qspace), exact, atol=1e-12 * scale)
    np.testing.assert_allclose(covariance_of(dense), exact, atol=1e-12 * scale)
    np.testing.assert_allclose(msd_qspace, msd_dense, atol=1e-12 * scale)
    plain = QSpaceSampler(copy.deepcopy(nacl_conventional).set_born(None), SUPERCELL, T)
    assert np.abs(plain.mean_square_displacement().detach().numpy() - msd_qspace).max() > 1e-3 * scale


def test_quantum_statistics_with_the_dipole_term(nacl_conventional):
    """Quantum: the q-space covariance is the numpy mode sum of the dense Hessian's modes, and at 20 K ⟨u²⟩ exceeds
    the classical one (zero-point motion)."""
    temperature = 20.0
    quantum = QSpaceSampler(nacl_conventional, SUPERCELL, temperature, statistics="quantum")
    classical = QSpaceSampler(nacl_conventional, SUPERCELL, temperature)
    dense = DenseSampler(nacl_conventional, SUPERCELL, temperature)
    with torch.no_grad():
        exact = exact_covariance(dense.hessian().numpy(), dense._masses().numpy(), quantum_energy(temperature))
        msd_quantum = quantum.mean_square_displacement().numpy()
        msd_classical = classical.mean_square_displacement().numpy()
    np.testing.assert_allclose(covariance_of(quantum), exact, atol=1e-12 * np.abs(exact).max())
    trace = np.einsum("aii->a", msd_quantum) / np.einsum("aii->a", msd_classical)
    assert np.all(trace > 2.0)  # NaCl at 20 K: ħω ≫ k_BT


def test_fitted_charges_reuse_the_unit_charge_sums(nacl_conventional, monkeypatch):
    """With Z* fitted the Ewald sum over G is done once: a second charge gives the dipole term a fresh sampler gives
    (to round-off), and both samplers take the same unit-charge sums from the process's cache."""
    import collections

    import ase_tds.dipole
    import ase_tds.source

    calls = []
    kernel = ase_tds.dipole.dipole_kernel
    monkeypatch.setattr(ase_tds.dipole, "dipole_kernel", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(ase_tds.source, "_DIPOLE_KERNELS", collections.OrderedDict())  # not the other tests' entries
    model = copy.deepcopy(nacl_conventional).set_born(nacl_conventional.born, fit=True)
    qspace = QSpaceSampler(model, SUPERCELL, T)
    with torch.no_grad():
        first = qspace.unit_dipole_matrix()
        model.theta[-1] *= 0.8  # Z*(Na)xx
        second = qspace.unit_dipole_matrix()
        fresh = QSpaceSampler(copy.deepcopy(model), SUPERCELL, T).unit_dipole_matrix()
    assert len(calls) == 1  # once for both samplers
    np.testing.assert_allclose(second.numpy(), fresh.numpy(), rtol=0, atol=1e-12 * np.abs(fresh.numpy()).max())
    assert np.abs(second.numpy() - first.numpy()).max() > 0.1 * np.abs(first.numpy()).max()


@pytest.mark.parametrize("statistics", ["classical", "quantum"])
def test_gradient_in_the_fitted_born_charge_and_force_constants(nacl_conventional, statistics):
    """gradcheck of the sampled Σ_Q I(Q) (fixed noise) in θ, the fitted charge Z*(Na)xx included, 1×1×2 supercell."""
    model = copy.deepcopy(nacl_conventional).set_born(nacl_conventional.born, fit=True)
    assert model.labels[-1] == "Z*(Na)xx"
    sampler = QSpaceSampler(model, (1, 1, 2), T, statistics, n_samples=3, seed=5, progress=False)
    tds = tds_model(model, T, method="sampling", statistics=statistics, sampler=sampler)
    q = torch.as_tensor(model.q_from_hkl([[1, 0, 0.5], [2, 1, 1.5], [1, 1, 1], [0, 3, 2.5]]))
    theta = model.theta.detach().clone().requires_grad_(True)

    def total(theta):
        return functional_call(tds, {"force_constants.theta": theta}, (q,)).sum()

    assert torch.autograd.gradcheck(total, (theta,), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.grad(total(theta), theta)[0][-1].abs() > 0  # the charge does enter
