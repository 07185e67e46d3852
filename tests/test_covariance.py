"""Thermal displacement covariance (docs/theory.md), each quantity against an independent route, float64.

- C̃(q) (`thermal_covariance`): phonopy's own dynamical matrix at q, diagonalised with numpy.
- C_{κ0,κ'l} (`real_space_covariance`): a dense supercell Hessian built on positions, pseudo-inverted
  with numpy after removing the three mass-weighted translations (classical and quantum).
- ⟨u uᵀ⟩ (`mean_square_displacement`): phonopy's mesh modes summed here, and phonopy's own
  ThermalDisplacementMatrices; `converged_mean_square_displacement` against a phonopy fine-mesh
  extrapolation.
- `HermitianFunction`: finite differences (gradcheck) at an exactly degenerate pair, and
  torch.linalg.inv's autograd where f(λ) = 1/λ. `HermitianInverse`, `InverseForm`: gradcheck and
  numpy's inverse; the series by moments / Paterson–Stockmeyer against plain powers of D.

Units are ase.units (CODATA 2014) as in the package; where phonopy's or euphonic's own constants enter,
the tolerance says so. The helpers here (crystals, dense supercells, mode weights) are reused by
test_tds.py.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.emt import EMT
from phonopy import Phonopy
from phonopy.physical_units import get_physical_units
from phonopy.structure.atoms import PhonopyAtoms

from ase_tds import ForceConstantModel
from ase_tds import covariance, scattering
from ase_tds.covariance import (
    HermitianFunction,
    HermitianInverse,
    InverseForm,
    UnstableError,
    ThermalCovariance,
    quantum_series,
)

from conftest import cached_model

STATISTICS = ["classical", "quantum"]
T_ROOM = 300.0

# ----------------------------------------------------------------------------- crystals
AUCU3_A = 3.71  # EMT equilibrium lattice constant of L1₂ AuCu3 (stress < 0.01 eV/Å³)
# rock salt with Born–von Kármán constants (eV/Å²) chosen here: Na and Cl second shells differ, stable
NACL_BVK = {"1XX(Na-Cl)": 1.5, "1YY(Na-Cl)": 0.1, "2XX(Na-Na)": 0.2, "2ZZ(Na-Na)": -0.02, "2XY(Na-Na)": 0.2,
            "2XX(Cl-Cl)": 0.3, "2ZZ(Cl-Cl)": -0.03, "2XY(Cl-Cl)": 0.3}


def aucu3_atoms() -> Atoms:
    return Atoms("AuCu3", scaled_positions=[[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]],
                 cell=[AUCU3_A] * 3, pbc=True)


@functools.lru_cache(maxsize=None)
def emt_aucu3() -> ForceConstantModel:
    """L1₂ AuCu3, 2 shells (14 parameters), from EMT finite displacements. Shared: do not modify."""
    return ForceConstantModel(aucu3_atoms(), shells=2).set_from_calculator(EMT(), progress=False)


@functools.lru_cache(maxsize=None)
def bvk_nacl() -> ForceConstantModel:
    """Rock salt NaCl (2-atom fcc primitive cell, masses 23 and 35.5), 2 shells, NACL_BVK. Shared."""
    return cached_model("NaCl").set_from_bvk(NACL_BVK)


@functools.lru_cache(maxsize=None)
def emt_ni_model(ni5_template, emt_phonopy) -> ForceConstantModel:
    """5-shell fcc Ni (conventional cell given) projected from the conftest EMT phonopy run. Shared."""
    return copy.deepcopy(ni5_template).set_from_phonopy(emt_phonopy)


@pytest.fixture(scope="module")
def models(ni5_model_cached, emt_ni_phonopy):
    """name → a shared (read-only) model."""
    return {"Ni": emt_ni_model(ni5_model_cached, emt_ni_phonopy), "AuCu3": emt_aucu3(), "NaCl": bvk_nacl()}


# ----------------------------------------------------------------------------- independent helpers
def hbar_omega(lam):
    """ħω in eV for ω² = lam in eV/Å²/amu, from ase.units (not from ase_tds)."""
    return units._hbar * np.sqrt(np.asarray(lam) * units._e / (1e-20 * units._amu)) / units._e


def mode_weight(lam, temperature, statistics):
    """Mass-weighted covariance of one mode, Å²·amu: k_BT/ω² or (ħω/2)coth(ħω/2k_BT)/ω²."""
    lam = np.asarray(lam, dtype=float)
    if statistics == "classical":
        return units.kB * temperature / lam
    hw = hbar_omega(lam)
    if temperature == 0:
        return 0.5 * hw / lam
    return 0.5 * hw / np.tanh(hw / (2 * units.kB * temperature)) / lam


def phonopy_atoms(atoms: Atoms) -> PhonopyAtoms:
    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.array(atoms.cell[:]),
                        scaled_positions=atoms.get_scaled_positions(), masses=atoms.get_masses())


def order_of(model, positions) -> np.ndarray:
    """perm with positions[i] ≡ model.primitive.positions[perm[i]] modulo primitive lattice vectors."""
    cell = np.array(model.primitive.cell[:])
    diff = (np.asarray(positions)[:, None] - model.primitive.positions[None]) @ np.linalg.inv(cell)
    diff -= np.round(diff)
    dist = np.linalg.norm(diff @ cell, axis=-1)
    perm = dist.argmin(axis=1)
    assert np.all(dist.min(axis=1) < 1e-6) and len(set(perm)) == len(perm)
    return perm


_PHONOPY: dict = {}


def supercell_phonopy(model, L: int, symmetry: bool = False) -> Phonopy:
    """phonopy on L×L×L primitive cells of `model`, its force constants from the model (cached).

    Built on the primitive cell itself (primitive_matrix = 1), symmetry search off unless asked for
    (phonopy's search dominates the cost for 100+ atoms)."""
    key = (id(model), L, symmetry)
    if key not in _PHONOPY:
        ph = Phonopy(phonopy_atoms(model.primitive), supercell_matrix=L * np.eye(3, dtype=int),
                     primitive_matrix=np.eye(3), is_symmetry=symmetry)
        with torch.no_grad():
            ph.force_constants = model.force_constants(ph, "compact").numpy()
        _PHONOPY[key] = ph
    return _PHONOPY[key]


# L×L×L primitive cells holding each model's cutoff (shortest translation > 2 × cutoff)
PHONOPY_SUPERCELL = {"Ni": 5, "AuCu3": 3, "NaCl": 3}
_DENSE: dict = {}


def dense_supercell(model, L: int) -> "DenseSupercell":
    key = (id(model), L)
    if key not in _DENSE:
        _DENSE[key] = DenseSupercell(model, L)
    return _DENSE[key]


class DenseSupercell:
    """L×L×L primitive cells of `model` as a dense system: positions (N, 3) Å, masses (N,) amu, H (3N, 3N).

    H comes from the model's Φ folded onto phonopy's supercell (`model.force_constants(ph, "full")`),
    with phonopy's atom order; everything after that is plain numpy on positions.
    """

    def __init__(self, model, L: int):
        ph = supercell_phonopy(model, L)
        with torch.no_grad():
            fc = model.force_constants(ph, "full").numpy()
        self.n_atoms = n = len(ph.supercell)
        self.positions = np.array(ph.supercell.positions)
        self.cell = np.array(ph.supercell.cell)
        self.masses = np.array(ph.supercell.masses)
        self.symbols = list(ph.supercell.symbols)
        self.hessian = fc.transpose(0, 2, 1, 3).reshape(3 * n, 3 * n)
        assert np.abs(self.hessian - self.hessian.T).max() < 1e-12
        w = np.repeat(self.masses, 3)
        self.inv_sqrt_m = 1 / np.sqrt(w)
        lam, vec = np.linalg.eigh(self.hessian * np.outer(self.inv_sqrt_m, self.inv_sqrt_m))
        # the three lowest modes must be exactly the mass-weighted rigid translations
        trans = np.zeros((3 * n, 3))
        for a in range(3):
            trans[a::3, a] = np.sqrt(self.masses / self.masses.sum())
        assert np.abs(lam[:3]).max() < 1e-10 * lam.max() and lam[3] > 1e-6 * lam.max()
        assert np.allclose(np.linalg.svd(trans.T @ vec[:, :3], compute_uv=False), 1.0, atol=1e-8)
        self.lam, self.vec = lam[3:], vec[:, 3:]

    def covariance(self, temperature, statistics) -> np.ndarray:
        """⟨u_j u_kᵀ⟩ (N, 3, N, 3) Å², centre of mass fixed."""
        g = mode_weight(self.lam, temperature, statistics)
        c = (self.vec * g) @ self.vec.T * np.outer(self.inv_sqrt_m, self.inv_sqrt_m)
        return c.reshape(self.n_atoms, 3, self.n_atoms, 3)

    def index_of(self, positions) -> np.ndarray:
        """Supercell atom at each Cartesian position (M, 3), modulo the supercell."""
        inv = np.linalg.inv(self.cell)
        d = (np.asarray(positions)[:, None] - self.positions[None]) @ inv
        d -= np.round(d)
        dist = np.linalg.norm(d @ self.cell, axis=-1)
        idx = dist.argmin(axis=1)
        assert np.all(dist.min(axis=1) < 1e-6)
        return idx


# ----------------------------------------------------------------------------- C̃(q) against phonopy
def phonopy_dynamical_matrix(model, ph, q_cart):
    """phonopy's D(q) (3n, 3n) in the model's atom order, for Cartesian q."""
    perm = order_of(model, ph.primitive.positions)
    assert np.allclose(ph.primitive.positions, model.primitive.positions[perm], atol=1e-8)
    q_red = np.asarray(q_cart) @ np.array(ph.primitive.cell).T / (2 * np.pi)
    ph.dynamical_matrix.run(q_red)
    dyn = np.array(ph.dynamical_matrix.dynamical_matrix)
    idx = np.concatenate([3 * k + np.arange(3) for k in np.argsort(perm)])
    return dyn[np.ix_(idx, idx)]


def reference_covariance(model, dyn, temperature, statistics, n_drop=0):
    """C̃ = M^{-1/2} V w(Λ) V† M^{-1/2} from numpy's eigh, the n_drop lowest (zero) modes left out."""
    lam, vec = np.linalg.eigh(dyn)
    if n_drop == len(lam):  # one atom at q = Γ: nothing but translations
        assert np.abs(lam).max() < 1e-12
        return np.zeros_like(dyn)
    if n_drop:
        assert np.abs(lam[:n_drop]).max() < 1e-10 * lam.max()
    lam, vec = lam[n_drop:], vec[:, n_drop:]
    assert lam.min() > 0
    inv_sqrt_m = np.repeat(1 / np.sqrt(model.masses.numpy()), 3)
    return (vec * mode_weight(lam, temperature, statistics)) @ vec.conj().T * np.outer(inv_sqrt_m, inv_sqrt_m)


@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize("name", ["Ni", "AuCu3", "NaCl"])
def test_thermal_covariance_matches_phonopy_dynamical_matrix(models, name, statistics, rng):
    """General q (unreduced, up to several zones out) and q = 0: our Cholesky / matrix-function C̃ against
    numpy on phonopy's D(q) (phonopy builds D from its supercell force constants and shortest vectors)."""
    model = models[name]
    ph = supercell_phonopy(model, PHONOPY_SUPERCELL[name])
    q = np.vstack([np.zeros((1, 3)), model.q_from_hkl(rng.uniform(-3, 3, size=(10, 3)))])
    with torch.no_grad():
        ours = ThermalCovariance(model, T_ROOM, statistics)(q).numpy()
    worst = 0.0
    for i, qi in enumerate(q):
        dyn = phonopy_dynamical_matrix(model, ph, qi)
        assert np.abs(dyn - dyn.conj().T).max() < 1e-12
        ref = reference_covariance(model, dyn, T_ROOM, statistics, n_drop=3 if i == 0 else 0)
        scale = np.abs(ours).max()
        worst = max(worst, np.abs(ours[i] - ref).max() / scale)
        assert np.abs(ours[i] - ours[i].conj().T).max() < 1e-14 * scale
    print(f"{name} {statistics}: max |ΔC̃| / max |C̃| = {worst:.2e}")
    assert worst < 1e-10


GAMMA_CASES = [
    ("Ni", (2, 0, 0)), ("Ni", (1, 1, 1)), ("Ni", (-3, 1, 1)),
    ("AuCu3", (0, 0, 0)), ("AuCu3", (2, 0, 0)), ("AuCu3", (2, 2, -4)),
    ("NaCl", (0, 0, 0)), ("NaCl", (2, 0, 0)),
    # superstructure reflections, G·r_κ ∉ 2πℤ for some atoms: the zero modes of the position-convention
    # D(G) are the phased translations e^{−iG·r_κ}√m_κ ê_α (an unphased projector gave C̃ wrong by 380 %)
    ("AuCu3", (1, 0, 0)), ("AuCu3", (1, 1, 0)), ("AuCu3", (0, 1, -3)), ("NaCl", (1, 1, 1)), ("NaCl", (-1, 3, 1)),
]


def _check_gamma(models, name, hkl, statistics):
    model = models[name]
    n = model.n_atoms
    q = model.q_from_hkl([hkl])
    with torch.no_grad():
        ours = ThermalCovariance(model, T_ROOM, statistics)(q)[0].numpy()
    if n == 1:  # all three modes are translations
        ref = np.zeros_like(ours)
    else:
        ph = supercell_phonopy(model, PHONOPY_SUPERCELL[name])
        ref = reference_covariance(model, phonopy_dynamical_matrix(model, ph, q[0]), T_ROOM, statistics, n_drop=3)
    # the fixed centre of mass: no covariance along the rigid translations, which at q = G read
    # u_κα ∝ e^{−iG·r_κ} in the position convention of C̃ (docs/theory.md)
    sqrt_m = np.repeat(np.sqrt(model.masses.numpy()), 3)
    trans = np.zeros((3 * n, 3), dtype=complex)
    for k in range(n):
        trans[3 * k:3 * k + 3] = np.exp(-1j * q[0] @ model.primitive.positions[k]) * np.eye(3)
    trans *= sqrt_m[:, None] / np.sqrt(model.masses.sum().item())
    weighted = sqrt_m[:, None] * ours * sqrt_m[None]
    scale = mode_weight(np.array([1.0]), T_ROOM, statistics)[0]  # Å²·amu for ω² = 1 eV/Å²/amu
    leak = np.abs(weighted @ trans).max() / scale
    err = np.abs(ours - ref).max() / (np.abs(ref).max() if n > 1 else scale / model.masses.max().item())
    print(f"{name} {hkl} {statistics}: error {err:.2e}, translation leak {leak:.2e}")
    assert err < 1e-10 and leak < 1e-10


@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize("name, hkl", GAMMA_CASES)
def test_covariance_at_reciprocal_lattice_vectors_removes_translations(models, name, hkl, statistics):
    """At q = G the rigid translations are removed, nothing else (for one-atom Ni: C̃(G) = 0): numpy on
    phonopy's D(G) with its three zero modes dropped, and no covariance left along the phased
    translations."""
    _check_gamma(models, name, hkl, statistics)



# ----------------------------------------------------------------------------- quantum: series vs eigen-decomposition
def _without_series(monkeypatch):
    """Force the eigen-decomposition (Daleckii–Krein) route of the quantum matrix function."""
    monkeypatch.setattr(covariance, "quantum_series", lambda model, temperature: None)


@pytest.mark.parametrize("name", ["Ni", "AuCu3", "NaCl"])
def test_quantum_series_equals_eigen_decomposition(models, name, rng, monkeypatch):
    """At 300 K the quantum C̃(q) and one-phonon form v†C̃v come from k_BT·D⁻¹ plus the x·coth x series;
    they equal the eigen-decomposition route, at general q and at Γ points (translations removed), and
    the series is refused (eigen route) at 20 K, where ħω/2k_BT ≥ 3π/4 for the bound on ω."""
    model = models[name]
    q = torch.as_tensor(np.vstack([model.q_from_hkl([(0, 0, 0), (2, 0, 0), (1, 1, 1)]),
                                   model.q_from_hkl(rng.uniform(-3, 3, size=(12, 3)))]))
    v = torch.as_tensor(rng.normal(size=(len(q), model.n_atoms)))
    with torch.no_grad():
        assert torch.linalg.eigvalsh(model.dynamical_matrix(q)).max() <= model.eigenvalue_bound()
        assert quantum_series(model, T_ROOM) is not None
        assert quantum_series(model, 20.0) is None
        series_cov = ThermalCovariance(model, T_ROOM, "quantum")(q)
        series_i1 = scattering.one_phonon_intensity(ThermalCovariance(model, T_ROOM, "quantum"), q, v)
        _without_series(monkeypatch)
        eigen_cov = ThermalCovariance(model, T_ROOM, "quantum")(q)
        eigen_i1 = scattering.one_phonon_intensity(ThermalCovariance(model, T_ROOM, "quantum"), q, v)
    cov_error = float((series_cov - eigen_cov).abs().max() / eigen_cov.abs().max())
    i1_error = float(((series_i1 - eigen_i1).abs() / eigen_i1.abs().max()).max())
    print(f"{name}: series vs eigh, C̃ {cov_error:.1e}, I₁ {i1_error:.1e}")
    assert cov_error < 1e-12 and i1_error < 1e-12


def test_quantum_series_gradient_equals_daleckii_krein_at_degeneracies(models, monkeypatch):
    """d I₁/dθ at X and L of Ni (degenerate transverse modes) and along Γ–X: the series route (autograd
    through matrix products) equals the eigen route with its Daleckii–Krein backward."""
    model = copy.deepcopy(models["Ni"])
    q = torch.as_tensor(model.q_from_hkl([(1, 0, 0), (1.5, 1.5, 1.5), (2.3, 0, 0), (0.3, 1.2, 2.1)]))
    amplitude = torch.ones(len(q), 1, dtype=q.dtype)

    def gradient():
        model.theta.grad = None
        scattering.one_phonon_intensity(ThermalCovariance(model, T_ROOM, "quantum"), q, amplitude).sum().backward()
        return model.theta.grad.clone()

    series = gradient()
    _without_series(monkeypatch)
    eigen = gradient()
    assert torch.allclose(series, eigen, rtol=1e-10, atol=1e-12 * float(eigen.abs().max()))


# ----------------------------------------------------------------------------- real space: dense supercell
@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize("name, L", [("Ni", 5), ("NaCl", 4), ("AuCu3", 3)])
def test_real_space_covariance_matches_dense_supercell(models, name, L, statistics):
    """C_{κ0,κ'l} from the FFT of C̃ on the L³ mesh = the covariance of the periodic L×L×L supercell with
    its centre of mass fixed, from the dense Hessian's pseudo-inverse (eigh, translations dropped)."""
    model = models[name]
    dense = dense_supercell(model, L)
    ref = dense.covariance(T_ROOM, statistics)
    with torch.no_grad():
        seps, corr = (x.numpy() for x in ThermalCovariance(model, T_ROOM, statistics).real_space((L, L, L)))
    n = model.n_atoms
    assert seps.shape == (L ** 3, n, n, 3) and corr.shape == (L ** 3, n, n, 3, 3)
    origin = dense.index_of(model.primitive.positions)  # κ0
    pos = model.primitive.positions
    target = dense.index_of((pos[None, :, None, :] + seps).reshape(-1, 3)).reshape(L ** 3, n, n)
    # every (κ0, κ'l) pair once: the grid covers the supercell
    for k in range(n):
        assert sorted(target[:, k, :].ravel()) == list(range(dense.n_atoms))
    expected = ref[origin[None, :, None], :, target, :]  # (G, n, n, 3, 3): C[κ0 α, κ'l β]
    err = np.abs(corr - expected).max() / np.abs(ref).max()
    print(f"{name} L={L} {statistics}: max |ΔC|/max|C| = {err:.2e}")
    assert err < 1e-10


# ----------------------------------------------------------------------------- ⟨u uᵀ⟩ against phonopy modes
def phonopy_mesh_msd(model, ph, mesh, temperature, statistics):
    """(1/N_q) Σ_qν w(λ) Re(e_κν e_κν†)/m_κ from phonopy's Γ-centred mesh modes (acoustic Γ modes out)."""
    ph.run_mesh([mesh] * 3, is_gamma_center=True, is_mesh_symmetry=False, with_eigenvectors=True)
    freqs = np.array(ph.mesh.frequencies)  # THz
    vecs = np.array(ph.mesh.eigenvectors)  # (N_q, 3n, 3n), columns are modes
    lam = (freqs / get_physical_units().DefaultToTHz) ** 2  # eV/Å²/amu
    weight = np.zeros_like(lam)
    gamma = np.nonzero(np.all(np.abs(ph.mesh.qpoints) < 1e-12, axis=1))[0]
    assert len(gamma) == 1
    keep = np.ones_like(lam, dtype=bool)
    keep[gamma[0], :3] = False
    assert np.abs(freqs[~keep]).max() < 1e-4 and freqs[keep].min() > 0
    weight[keep] = mode_weight(lam[keep], temperature, statistics)
    n = model.n_atoms
    e = vecs.reshape(len(lam), n, 3, 3 * n)
    msd = np.einsum("qv,qkav,qkbv->kab", weight, e, e.conj()).real / len(lam)
    masses = np.array(ph.primitive.masses)
    perm = order_of(model, ph.primitive.positions)
    out = np.empty_like(msd)
    out[perm] = msd / masses[:, None, None]
    return out


@pytest.mark.parametrize("name", ["Ni", "AuCu3"])
def test_mean_square_displacement_matches_phonopy_modes_on_the_same_mesh(models, name):
    """Same Γ-centred 6³ mesh: our BZ average = the sum over phonopy's eigenvectors to round-off, and =
    phonopy's ThermalDisplacementMatrices within its physical constants (CODATA 2018 k_B and ħ against
    ase's 2014: 9e-7 relative on ⟨u²⟩)."""
    model = models[name]
    ph = supercell_phonopy(model, PHONOPY_SUPERCELL[name])
    mesh = 6
    ours = {}
    for statistics in STATISTICS:
        with torch.no_grad():
            ours[statistics] = ThermalCovariance(model, T_ROOM, statistics).mean_square_displacement((mesh,) * 3).numpy()
        ref = phonopy_mesh_msd(model, ph, mesh, T_ROOM, statistics)
        err = np.abs(ours[statistics] - ref).max() / np.abs(ref).max()
        print(f"{name} {statistics}: mesh {mesh}³ vs phonopy modes {err:.2e}")
        assert err < 1e-10
    tdm = ph.run_thermal_displacement_matrices(temperatures=[T_ROOM], exclude_gamma_acoustic=True)
    theirs = np.array(tdm.thermal_displacement_matrices[0])
    theirs = theirs[np.argsort(order_of(model, ph.primitive.positions))]
    err = np.abs(ours["quantum"] - theirs).max() / np.abs(theirs).max()
    print(f"{name}: vs phonopy ThermalDisplacementMatrices {err:.2e}")
    assert err < 3e-6


def phonopy_mesh_frequencies(ph, mesh):
    """phonopy's frequencies (THz) and weights on the irreducible points of a Γ-centred mesh, Γ left out."""
    ph.run_mesh([mesh] * 3, is_gamma_center=True, is_mesh_symmetry=True)
    freqs, weights = np.array(ph.mesh.frequencies), np.array(ph.mesh.weights)
    assert np.all(np.array(ph.mesh.qpoints[0]) == 0) and np.abs(freqs[0]).max() < 1e-4
    return freqs[1:], weights[1:], weights.sum()


def phonopy_isotropic_msd(ph, freqs, weights, total, temperature, statistics):
    """tr⟨uuᵀ⟩/3 of one-atom fcc Ni from mesh frequencies (|e|² = 1 per mode; Γ's acoustic modes out)."""
    lam = (freqs / get_physical_units().DefaultToTHz) ** 2
    per_q = mode_weight(lam, temperature, statistics).sum(axis=1) / ph.primitive.masses[0]
    return (per_q * weights).sum() / total / 3


def test_converged_mean_square_displacement_matches_phonopy_fine_mesh(models):
    """Ni: our 12³/24³ Richardson value against phonopy frequencies on 16³, 32³, 64³ meshes (irreducible
    points, phonopy's symmetry), extrapolated here to second order (error a/m + b/m² of a Γ-centred mesh
    that leaves out the acoustic Γ modes: (8·u₆₄ − 6·u₃₂ + u₁₆)/3, within 3e-5 of the 32/64/128 value).
    Tolerance 1e-3: our two-mesh extrapolation keeps an O(1/m²) residual, measured 4e-4; a single
    12³ mesh is off by O(1/m), 8 %."""
    model = models["Ni"]
    ph = supercell_phonopy(model, PHONOPY_SUPERCELL["Ni"], symmetry=True)
    freqs = {m: phonopy_mesh_frequencies(ph, m) for m in (12, 16, 32, 64)}
    for statistics in STATISTICS:
        u = {m: phonopy_isotropic_msd(ph, *freqs[m], T_ROOM, statistics) for m in freqs}
        ref = (8 * u[64] - 6 * u[32] + u[16]) / 3
        with torch.no_grad():
            ours = ThermalCovariance(model, T_ROOM, statistics).converged_mean_square_displacement(mesh=12)[0].numpy()
            single = ThermalCovariance(model, T_ROOM, statistics).mean_square_displacement((12,) * 3)[0].numpy()
        err = abs(np.trace(ours) / 3 / ref - 1)
        print(f"{statistics}: <u_x²> {np.trace(ours) / 3:.6e} Å² vs phonopy extrapolated {ref:.6e} "
              f"({err:.1e}); one 12³ mesh {abs(np.trace(single) / 3 / ref - 1):.1e}")
        assert err < 1e-3
        assert abs(np.trace(single) / 3 / ref - 1) > 1e-2  # why the extrapolation is needed
        # phonopy's symmetry-reduced 12³ mesh reproduces our full 12³ mesh
        assert abs(np.trace(single) / 3 / u[12] - 1) < 1e-10


def test_mean_square_displacement_physics(models):
    """Cubic Ni isotropic; quantum > classical at 300 K; classical ∝ T exactly; quantum finite at 0 K
    (zero point) and approaching classical from above at high T; AuCu3: Au (m-3m site) isotropic,
    Cu (4/mmm site) uniaxial along its own axis."""
    ni = models["Ni"]
    mesh = (8, 8, 8)
    with torch.no_grad():
        msd = {(s, t): ThermalCovariance(ni, t, s).mean_square_displacement(mesh)[0].numpy()
               for s, t in [("classical", 300.0), ("classical", 600.0), ("quantum", 300.0), ("quantum", 0.0),
                            ("quantum", 3000.0), ("classical", 3000.0)]}
    for value in msd.values():
        iso = np.trace(value) / 3
        assert np.abs(value - iso * np.eye(3)).max() < 1e-12 * iso
    u = {k: np.trace(v) / 3 for k, v in msd.items()}
    assert abs(u["classical", 600.0] / u["classical", 300.0] - 2) < 1e-12
    assert u["quantum", 300.0] > u["classical", 300.0]
    assert 0 < u["quantum", 0.0] < u["quantum", 300.0]
    # high-T expansion: quantum − classical → Σ ħ²/(12 m k_BT)·…, i.e. ratio − 1 ∝ 1/T² and small
    r300 = u["quantum", 300.0] / u["classical", 300.0] - 1
    r3000 = u["quantum", 3000.0] / u["classical", 3000.0] - 1
    assert 0 < r3000 < 1e-3 and abs(r300 / r3000 / 100 - 1) < 0.05
    print(f"Ni <u_x²>: classical {u['classical', 300.0]:.5e}, quantum {u['quantum', 300.0]:.5e}, "
          f"zero point {u['quantum', 0.0]:.5e} Å²")

    with torch.no_grad():
        au = ThermalCovariance(models["AuCu3"], T_ROOM, "quantum").mean_square_displacement((6, 6, 6)).numpy()
    pos = models["AuCu3"].primitive.positions
    assert np.abs(au[0] - np.trace(au[0]) / 3 * np.eye(3)).max() < 1e-12 * au[0].max()
    for k in (1, 2, 3):
        axis = int(np.argmin(np.abs(pos[k])))  # the Cu at (0,½,½)a has its 4-fold axis along x
        d = np.diag(au[k])
        others = [i for i in range(3) if i != axis]
        assert np.abs(au[k] - np.diag(d)).max() < 1e-12 * d.max()
        assert abs(d[others[0]] - d[others[1]]) < 1e-12 * d.max() and abs(d[axis] - d[others[0]]) > 1e-3 * d.max()


# ----------------------------------------------------------------------------- HermitianFunction
def _f_and_fprime(lam):
    """f(λ) = e^{−λ}/λ and f'(λ): a smooth matrix function with a non-trivial divided difference."""
    f = torch.exp(-lam) / lam
    return f, -f - f / lam


def _degenerate_hermitian(rng, m=6):
    z = rng.normal(size=(m, m)) + 1j * rng.normal(size=(m, m))
    u, _ = np.linalg.qr(z)
    lam = np.array([0.7, 0.7, 1.3, 2.0, 2.0, 3.1])[:m]  # two exactly degenerate pairs
    a = (u * lam) @ u.conj().T
    return torch.as_tensor(0.5 * (a + a.conj().T)), rng


def test_hermitian_function_backward_matches_finite_differences_at_degeneracy(rng):
    """Daleckii–Krein backward against gradcheck's finite differences, expanding A(t) = A₀ + Σ t_k E_k
    (E_k random Hermitian) about an A₀ with exactly degenerate pairs."""
    a0, rng = _degenerate_hermitian(rng)
    m = a0.shape[0]
    dirs = []
    for _ in range(5):
        e = rng.normal(size=(m, m)) + 1j * rng.normal(size=(m, m))
        dirs.append(0.5 * (e + e.conj().T))
    dirs = torch.as_tensor(np.array(dirs))

    def func(t):
        a = a0 + torch.einsum("k,kij->ij", t.to(dirs.dtype), dirs)
        return torch.view_as_real(HermitianFunction.apply(a, _f_and_fprime))

    t0 = torch.zeros(len(dirs), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(func, (t0,), eps=1e-6, atol=1e-9, rtol=1e-6)
    # forward: f(A) against scipy's matrix function
    from scipy.linalg import expm, inv
    a = a0.numpy()
    assert np.abs(HermitianFunction.apply(a0, _f_and_fprime).numpy() - expm(-a) @ inv(a)).max() < 1e-13


def test_hermitian_function_inverse_gradient_equals_linalg_inv(rng):
    """With f(λ) = 1/λ, f(A) = A⁻¹: value and gradient of Re tr(B f(A)) against torch.linalg.inv's
    autograd (no eigenvectors there), at exact degeneracy; plain autograd through eigh is shown off."""
    a0, rng = _degenerate_hermitian(rng)
    b = torch.as_tensor(rng.normal(size=a0.shape) + 1j * rng.normal(size=a0.shape))

    def loss(fa):
        return torch.einsum("ij,ji->", b, fa).real

    a1 = a0.clone().requires_grad_(True)
    ours = HermitianFunction.apply(a1, lambda lam: (1 / lam, -1 / lam ** 2))
    (g_ours,) = torch.autograd.grad(loss(ours), a1)
    a2 = a0.clone().requires_grad_(True)
    ref = torch.linalg.inv(a2)
    (g_ref,) = torch.autograd.grad(loss(ref), a2)
    assert torch.abs(ours - ref).max() < 1e-13
    # torch's gradient of a real loss w.r.t. a Hermitian matrix: compare the Hermitian parts
    herm = lambda g: 0.5 * (g + g.mH)  # noqa: E731
    err = torch.abs(herm(g_ours) - herm(g_ref)).max() / torch.abs(g_ref).max()
    assert err < 1e-12

    a3 = a0.clone().requires_grad_(True)
    lam, vec = torch.linalg.eigh(a3)
    naive = (vec / lam.to(vec.dtype)[None, :]) @ vec.mH
    (g_naive,) = torch.autograd.grad(loss(naive), a3)
    off = torch.abs(herm(g_naive) - herm(g_ref)).max() / torch.abs(g_ref).max()
    print(f"Daleckii–Krein error {err:.1e}; plain eigh autograd error {off:.1e}")
    assert not torch.isfinite(off) or off > 1e-3


# ----------------------------------------------------------------------------- errors
def test_covariance_rejects_bad_statistics_and_temperature(models):
    model, q = models["Ni"], np.array([[0.3, 0.2, 0.1]])
    with pytest.raises(ValueError, match="statistics"):
        ThermalCovariance(model, T_ROOM, "bose")(q)
    for bad in (-1.0, float("nan"), float("inf")):
        for statistics in STATISTICS:
            with pytest.raises(ValueError, match="temperature"):
                ThermalCovariance(model, bad, statistics)(q)
    with pytest.raises(ValueError, match="temperature"):
        ThermalCovariance(model, 0.0, "classical")(q)
    with torch.no_grad():
        zero_point = ThermalCovariance(model, 0.0, "quantum")(q)
    assert torch.isfinite(zero_point).all() and torch.linalg.eigvalsh(zero_point[0]).min() > 0


@pytest.mark.parametrize("statistics", STATISTICS)
def test_unstable_force_constants_raise(models, statistics):
    model = copy.deepcopy(models["Ni"])
    theta = model.parameter_dict()
    theta["1XX"] = -theta["1XX"]
    model.set_from_bvk(theta)
    with pytest.raises(UnstableError):
        ThermalCovariance(model, T_ROOM, statistics)(model.q_from_hkl([[0.5, 0.5, 0.5], [1, 0, 0], [0.1, 0.2, 0.3]]))
    with pytest.raises(UnstableError):
        ThermalCovariance(model, T_ROOM, statistics).mean_square_displacement((4, 4, 4))


def _hermitian_path(rng, m=7):
    """A(t) = A₀ + Σ t_k E_k: A₀ Hermitian positive definite (m, m), E_k (5 random Hermitian directions)."""
    z = rng.normal(size=(m, m)) + 1j * rng.normal(size=(m, m))
    a0 = torch.as_tensor(z @ z.conj().T + m * np.eye(m))
    e = rng.normal(size=(5, m, m)) + 1j * rng.normal(size=(5, m, m))
    dirs = torch.as_tensor(0.5 * (e + e.conj().transpose(0, 2, 1)))
    return lambda t: a0 + torch.einsum("k,kij->ij", t.to(dirs.dtype), dirs)


def test_explicit_inverse_backwards_match_finite_differences(rng):
    """HermitianInverse (−D⁻¹GD⁻¹) and InverseForm (−ww†, 2 Re w) against gradcheck, a batch of two D."""
    paths = [_hermitian_path(rng), _hermitian_path(rng)]
    v0 = torch.as_tensor(rng.normal(size=(2, 7)))
    dv = torch.as_tensor(rng.normal(size=(5, 2, 7)))

    def batch(t):
        return torch.stack([path(t) for path in paths])

    def inverse(t):
        return torch.view_as_real(HermitianInverse.apply(batch(t), "test"))

    def form(t):
        return InverseForm.apply(batch(t), v0 + torch.einsum("k,kbi->bi", t, dv), "test")

    t0 = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(inverse, (t0,), eps=1e-6, atol=1e-9, rtol=1e-6)
    assert torch.autograd.gradcheck(form, (t0,), eps=1e-6, atol=1e-9, rtol=1e-6)
    a = batch(t0.detach()).numpy()
    expected = np.einsum("bi,bij,bj->b", v0.numpy(), np.linalg.inv(a), v0.numpy()).real
    assert np.abs(form(t0.detach()).numpy() / expected - 1).max() < 1e-13
    assert np.abs(HermitianInverse.apply(batch(t0.detach()), "test").numpy() - np.linalg.inv(a)).max() < 1e-14
    with pytest.raises(UnstableError, match="1 of 2 test"):
        InverseForm.apply(torch.stack([paths[0](t0.detach()), -paths[1](t0.detach())]), v0, "test")
    with pytest.raises(TypeError, match="real v"):
        InverseForm.apply(batch(t0.detach()), v0.to(torch.complex128), "test")
    # first derivatives only: a second one raises instead of silently dropping terms
    (first,) = torch.autograd.grad(form(t0).sum(), t0, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(first.sum(), t0)


@pytest.mark.parametrize("terms", [1, 2, 5, 9, 16])
def test_series_by_moments_and_paterson_stockmeyer_equal_plain_powers(rng, terms):
    """quantum_series_form (moments from ⌈(K−1)/2⌉ products) and quantum_series_matrix (Paterson–Stockmeyer)
    against Σ b_k D^{k−1} by explicit powers, for K terms."""
    dyn = torch.stack([_hermitian_path(rng, 6)(torch.zeros(5)) for _ in range(3)])
    dyn = 0.7 * dyn / torch.linalg.eigvalsh(dyn).max()  # spectrum in (0, 0.7], as where the series is used
    b = rng.normal(size=terms)
    v = torch.as_tensor(rng.normal(size=(3, 6)))
    powers = [torch.linalg.matrix_power(dyn, k) for k in range(terms)]
    plain = sum(bk * p for bk, p in zip(b, powers))
    assert torch.abs(covariance.quantum_series_matrix(dyn, b, None) - plain).max() < 1e-13
    expected = torch.einsum("bi,bij,bj->b", v.to(dyn.dtype), plain, v.to(dyn.dtype)).real
    assert torch.abs(covariance.quantum_series_form(dyn, v, b, None) - expected).max() < 1e-12


def test_chunks_recomputed_in_the_backward_give_the_one_pass_gradient():
    """The Debye–Waller mesh runs in chunks whose backward recomputes them one at a time (`ChunkSum`, for
    memory), the real-space covariance in chunks; their values and θ-gradients equal one unchunked pass."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from ase_tds.covariance import mesh_q

    model = ForceConstantModel(bulk("Cu", "fcc", a=3.6) * (1, 1, 2), shells=2).set_from_calculator(EMT(),
                                                                                                  progress=False)
    covariance = ThermalCovariance(model, T_ROOM, "quantum")
    n, q = model.n_atoms, mesh_q(model, (4, 4, 4))
    blocks = (covariance(q).sum(0) / len(q)).real.reshape(n, 3, n, 3)  # one pass, no chunks
    whole = torch.stack([blocks[k, :, k, :] for k in range(n)])
    chunked = covariance.mean_square_displacement((4, 4, 4), chunk=7)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-15)
    grads = [torch.autograd.grad(x.square().sum(), model.theta)[0] for x in (chunked, whole)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12 * float(grads[1].abs().max()))
    one, many = (covariance.real_space((3, 3, 3), chunk=c).correlation for c in (10**6, 5))
    torch.testing.assert_close(many, one, rtol=1e-12, atol=1e-15)
    grads = [torch.autograd.grad(x.square().sum(), model.theta)[0] for x in (many, one)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12 * float(grads[1].abs().max()))
