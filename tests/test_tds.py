"""Forward-model intensities (docs/theory.md), each against an independent route, float64.

- one-phonon: euphonic's one-phonon structure factor (its own dynamical matrix and eigen-solve from the
  phonopy_params.yaml we export), weighted with coth(ħω/2k_BT) or 2k_BT/ħω; and euphonic's eigenvectors
  summed here with xraydb f₀(|Q|) for a compound.
- gaussian: its first order is the one-phonon model with the grid's own Debye–Waller factor; at Q commensurate
  with its grid it equals a brute-force sum over a dense periodic supercell whose covariance is the
  pseudo-inverse of its Hessian (numpy eigh); it carries the multi-phonon share of docs/theory.md. Its convergence to
  the infinite crystal is in test_convergence.py.
- limits in temperature, gradients (gradcheck in θ, including degenerate high-symmetry Q) and errors.

The same Debye–Waller W enters both sides of every comparison: the point is C̃ and the intensity sum.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import xraydb
from ase import units

from ase_tds import tds_model
from ase_tds.covariance import ThermalCovariance, UnstableError
from ase_tds.scattering import (DebyeWaller, LatticeWindow, multi_phonon_intensity, one_phonon_intensity,
                                 partition_of_unity)

from test_covariance import (  # noqa: F401  (models: a module fixture re-used here)
    STATISTICS,
    T_ROOM,
    dense_supercell,
    mode_weight,
    models,
    order_of,
)

try:  # a test extra (GPL-3): only the euphonic comparisons need it
    import euphonic
    from euphonic import ureg
    from euphonic.debye_waller import DebyeWaller as EuphonicDebyeWaller
except ImportError:  # pragma: no cover
    euphonic = None


def EUPHONIC(test):  # noqa: N802
    """Needs euphonic; its warning about two OpenMP runtimes (phonopy's and its own) only costs speed."""
    test = pytest.mark.filterwarnings("ignore:.*OpenMP.*")(test)
    return pytest.mark.skipif(euphonic is None, reason="euphonic is not installed")(test)

CONSTANT_F = {"Ni": {"Ni": 28.0}, "AuCu3": {"Au": 79.0, "Cu": 29.0}, "NaCl": {"Na": 11.0, "Cl": 17.0}}


def xraydb_f(symbols, q_norm):
    """f₀ (B, n) from xraydb at sinθ/λ = |Q|/4π, called here (not through ase_tds)."""
    return np.stack([np.asarray(xraydb.f0(s, q_norm / (4 * np.pi)), dtype=float) for s in symbols], axis=-1)


def relative_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) / np.asarray(ref) - 1)))


# ----------------------------------------------------------------------------- one-phonon against euphonic
@pytest.fixture(scope="module")
def euphonic_fc(models, tmp_path_factory):  # noqa: F811
    """euphonic ForceConstants read from the phonopy_params.yaml of our export, `model.to_phonopy` on the
    conventional cell (compact Φ, phonopy's primitive_matrix): euphonic builds its own primitive cell."""
    out = {}
    for name, reps in (("Ni", 4), ("AuCu3", 3)):
        folder = tmp_path_factory.mktemp(f"euphonic_{name}")
        models[name].to_phonopy(reps * np.eye(3, dtype=int)).save(
            str(folder / "phonopy_params.yaml"), settings={"force_constants": True})
        out[name] = euphonic.ForceConstants.from_phonopy(path=str(folder), summary_name="phonopy_params.yaml")
    return out


def euphonic_modes(fc, q_cart):
    """euphonic's modes at Cartesian Q (reduced in its own cell: Q itself, not folded by us)."""
    cell = fc.crystal.cell_vectors.to("angstrom").magnitude
    return fc.calculate_qpoint_phonon_modes(np.asarray(q_cart) @ cell.T / (2 * np.pi), asr=None)


def euphonic_order(model, fc):
    """model κ of each euphonic atom."""
    cell = fc.crystal.cell_vectors.to("angstrom").magnitude
    return order_of(model, fc.crystal.atom_r @ cell)


def euphonic_lambda(modes):
    """ω² in eV/Å²/amu from euphonic's mode energies, converted with euphonic's own (pint) constants."""
    omega = (modes.frequencies / ureg.hbar).to("1/s")
    return (omega ** 2 * ureg("amu") * ureg("angstrom") ** 2).to("eV").magnitude


@EUPHONIC
@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize("name", ["Ni", "AuCu3"])
def test_one_phonon_equals_euphonic_structure_factor(models, euphonic_fc, name, statistics, rng):  # noqa: F811
    """I₁(Q) = Σ_ν S_ν coth(ħω_ν/2k_BT) (quantum) or Σ_ν S_ν 2k_BT/ħω_ν (classical), S_ν from euphonic's
    calculate_structure_factor with b_κ = f_κ (constant per species) and W_κ = ½ Q·⟨u_κu_κᵀ⟩·Q from our
    mean-square displacement (so DW enters both identically). Q anywhere up to ~12 Å⁻¹, not at Γ.
    k_BT from ase.units on both sides: euphonic's pint k_B (CODATA 2018) differs from ase's by 3.5e-7."""
    model, fc = models[name], euphonic_fc[name]
    tds = tds_model(model, T_ROOM, method="one-phonon", statistics=statistics, form_factors=CONSTANT_F[name],
                   dw_mesh=6)
    q = model.q_from_hkl(rng.uniform(-4, 4, size=(40, 3)))
    with torch.no_grad():
        ours = tds(q).numpy()
        msd = tds.mean_square_displacement().numpy()
    perm = euphonic_order(model, fc)
    dw = EuphonicDebyeWaller(fc.crystal, ureg.Quantity(0.5 * msd[perm], "angstrom**2"), ureg.Quantity(T_ROOM, "K"))
    lengths = {s: ureg.Quantity(v, "fm") for s, v in CONSTANT_F[name].items()}
    sf = euphonic_modes(fc, q).calculate_structure_factor(scattering_lengths=lengths, dw=dw)
    s_nu = sf.structure_factors.to("fm**2").magnitude  # f² × dimensionless, per atom
    hw = sf.frequencies.to("eV").magnitude
    assert hw.min() > 0
    kt = units.kB * T_ROOM
    weight = 1 / np.tanh(hw / (2 * kt)) if statistics == "quantum" else 2 * kt / hw
    ref = (s_nu * weight).sum(axis=1)
    err = relative_error(ours, ref)
    print(f"{name} {statistics}: one-phonon vs euphonic S_ν, max relative {err:.1e}")
    assert err < 1e-8


def euphonic_sum(model, fc, q, msd, temperature, statistics, drop_translations=False):
    """(1/n) Σ_ν w(ω_ν²) |Σ_κ f_κ(|Q|) e^{−W_κ} (Q·e*_κν) e^{iQ·r_κ} / √m_κ|² with euphonic's eigenvectors
    (cell-origin convention, hence the e^{iQ·r_κ}) and xraydb f₀: an independent route to one-phonon."""
    modes = euphonic_modes(fc, q)
    perm = euphonic_order(model, fc)
    cell = fc.crystal.cell_vectors.to("angstrom").magnitude
    r = fc.crystal.atom_r @ cell
    mass = fc.crystal.atom_mass.to("amu").magnitude
    symbols = list(fc.crystal.atom_type)
    f = xraydb_f(symbols, np.linalg.norm(q, axis=1))
    w_exp = 0.5 * np.einsum("ba,kac,bc->bk", q, msd[perm], q)
    amp = f * np.exp(-w_exp) / np.sqrt(mass)  # (B, n)
    e = modes.eigenvectors  # (B, 3n modes, n, 3)
    f_nu = np.einsum("bk,bvka,ba,bk->bv", amp, e.conj(), q, np.exp(1j * q @ r.T))
    lam = euphonic_lambda(modes)
    if drop_translations:  # Q = G: the three acoustic modes are the rigid translations (ω = 0)
        order = np.argsort(np.abs(lam), axis=1)
        assert np.abs(np.take_along_axis(lam, order[:, :3], 1)).max() < 1e-10  # eV/Å²/amu; optical ≈ 0.1–1
        keep = np.ones_like(lam, dtype=bool)
        np.put_along_axis(keep, order[:, :3], False, axis=1)
    else:
        keep = lam > 0
        assert keep.all()
    weight = np.zeros_like(lam)
    weight[keep] = mode_weight(lam[keep], temperature, statistics)
    return (weight * np.abs(f_nu) ** 2).sum(axis=1) / model.n_atoms


@EUPHONIC
@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize("name", ["Ni", "AuCu3"])
def test_one_phonon_with_xraydb_form_factors_equals_euphonic_modes(models, euphonic_fc, name,  # noqa: F811
                                                                    statistics, rng):
    """Q-dependent f₀(|Q|) for every species (xraydb): the mode sum over euphonic's eigenvectors."""
    model, fc = models[name], euphonic_fc[name]
    tds = tds_model(model, T_ROOM, method="one-phonon", statistics=statistics, dw_mesh=6)
    q = model.q_from_hkl(rng.uniform(-4, 4, size=(40, 3)))
    with torch.no_grad():
        ours = tds(q).numpy()
        msd = tds.mean_square_displacement().numpy()
    ref = euphonic_sum(model, fc, q, msd, T_ROOM, statistics)
    err = relative_error(ours, ref)
    print(f"{name} {statistics}: one-phonon (xraydb f) vs euphonic modes, max relative {err:.1e}")
    assert err < 1e-8


def _one_phonon_at_g(models, euphonic_fc, name, hkl, statistics):  # noqa: F811
    model, fc = models[name], euphonic_fc[name]
    tds = tds_model(model, T_ROOM, method="one-phonon", statistics=statistics, dw_mesh=4)
    q = model.q_from_hkl([hkl])
    with torch.no_grad():
        ours = tds(q).numpy()
        msd = tds.mean_square_displacement().numpy()
    ref = euphonic_sum(model, fc, q, msd, T_ROOM, statistics, drop_translations=True)
    print(f"{name} {hkl} {statistics}: ours {ours[0]:.6e}, euphonic optical modes {ref[0]:.6e}")
    if model.n_atoms == 1:
        assert abs(ours[0]) < 1e-12
    else:
        assert relative_error(ours, ref) < 1e-8


@EUPHONIC
@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize("name, hkl", [("Ni", (2, 0, 0)), ("Ni", (1, 1, 1)), ("AuCu3", (2, 0, 0)),
                                       ("AuCu3", (0, 2, 2)), ("AuCu3", (2, -2, 4)),
                                       # superstructure reflections: G·r_Cu = π for two of the Cu atoms
                                       ("AuCu3", (1, 0, 0)), ("AuCu3", (1, 1, 0)), ("AuCu3", (3, 0, 1))])
def test_one_phonon_at_reciprocal_lattice_vectors(models, euphonic_fc, name, hkl, statistics):  # noqa: F811
    """At Q = G only the rigid translations are left out: euphonic's optical modes there (Ni: nothing)."""
    _one_phonon_at_g(models, euphonic_fc, name, hkl, statistics)


# ----------------------------------------------------------------------------- gaussian: first order
@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize("name", ["Ni", "AuCu3"])
def test_gaussian_first_order_is_the_one_phonon_model(models, name, statistics, rng):  # noqa: F811
    """gaussian − (its orders ≥ 2: LatticeWindow.intensity on the same grid's correlation) equals
    tds_model(method="one-phonon") with the grid's own Debye–Waller factor (dw_mesh="grid"), to round-off: the
    gaussian model is one periodic crystal, its W, first order and higher orders from one q mesh."""
    model = models[name]
    grid = (5, 5, 5)
    gauss = tds_model(model, T_ROOM, method="gaussian", statistics=statistics, grid=grid, refine=False)
    one = tds_model(model, T_ROOM, method="one-phonon", statistics=statistics, dw_mesh="grid", grid=grid)
    q = torch.as_tensor(model.q_from_hkl(rng.uniform(-3, 3, size=(30, 3))))
    with torch.no_grad():
        correlation, self_cov = gauss.grid_covariance()
        amp = gauss.amplitude(q, DebyeWaller(self_cov))
        window = LatticeWindow(model.primitive, grid)
        multi = window.intensity(q, amp, window.gather(correlation))
        total, first = gauss(q), one(q)
    err = (torch.abs(total - multi - first) / first).max().item()
    print(f"{name} {statistics}: |gaussian − multi − one-phonon| / one-phonon ≤ {err:.1e}; "
          f"multi-phonon share {(multi / total).min():.3f}–{(multi / total).max():.3f}")
    assert err < 1e-12 and (multi > 0).all()


def test_windowed_sum_equals_the_sharp_sum_on_the_grid_lattice(models, rng):  # noqa: F811
    """At Q on the grid's reciprocal lattice the partition of unity makes the windowed lattice sum (each ±l once,
    weight 2) the sharp sum over one period; off it the two differ (the window interpolates)."""
    for name, grid in (("Ni", (5, 5, 5)), ("AuCu3", (3, 4, 5))):
        model = models[name]
        separations, correlation = ThermalCovariance(model, T_ROOM, "quantum").real_space(grid)
        window = LatticeWindow(model.primitive, grid)
        recip = 2 * np.pi * np.linalg.inv(np.array(model.primitive.cell[:])).T
        on = torch.as_tensor((rng.integers(-12, 13, size=(20, 3)) / np.array(grid)) @ recip)
        off = on + torch.as_tensor(rng.uniform(0.1, 0.4, size=(20, 3)) / np.array(grid) @ recip)
        amp = torch.as_tensor(rng.uniform(5, 30, size=(20, model.n_atoms)))
        with torch.no_grad():
            for q, same in ((on, True), (off, False)):
                windowed = window.intensity(q, amp, window.gather(correlation))
                sharp = multi_phonon_intensity(q, amp, separations, correlation)
                err = (torch.abs(windowed - sharp) / torch.abs(sharp)).max().item()
                print(f"{name} {grid} {'on' if same else 'off'} the lattice: windowed vs sharp {err:.1e}")
                assert (err < 1e-10) if same else (err > 1e-6)


def test_lattice_window_is_a_partition_of_unity():
    x = np.linspace(-2, 2, 4001)
    total = sum(partition_of_unity(x + m) for m in range(-3, 4))
    np.testing.assert_allclose(total, 1.0, atol=1e-14)
    assert partition_of_unity(np.array([0.0]))[0] == 1 and partition_of_unity(np.array([0.75]))[0] == 0


@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize("name, L", [("Ni", 5), ("AuCu3", 3)])
def test_real_space_first_order_equals_q_space_at_commensurate_q(models, name, L, statistics, rng):  # noqa: F811
    """(1/n) Σ_κκ' A_κ A_κ' Σ_l cos(Q·d) Q·C_{κ0,κ'l}·Q over the L³ grid = one_phonon_intensity at Q on
    the grid's reciprocal lattice (the FFT's phase convention against the q-space one)."""
    model = models[name]
    q = model_commensurate_q(model, L, rng, 12)
    with torch.no_grad():
        seps, corr = ThermalCovariance(model, T_ROOM, statistics).real_space((L, L, L))
        amp = torch.as_tensor(rng.uniform(5, 30, size=(len(q), model.n_atoms)))
        x = torch.einsum("ba,gklac,bc->bgkl", q, corr, q)
        phase = torch.cos(torch.einsum("ba,gkla->bgkl", q, seps))
        real = torch.einsum("bk,bgkl,bl->b", amp, phase * x, amp) / model.n_atoms
        ref = one_phonon_intensity(ThermalCovariance(model, T_ROOM, statistics), q, amp)
    err = (torch.abs(real / ref - 1)).max().item()
    print(f"{name} L={L} {statistics}: real-space first order vs q-space {err:.1e}")
    assert err < 1e-10


# ----------------------------------------------------------------------------- gaussian against a dense supercell
def model_commensurate_q(model, L, rng, count, allow_gamma=False):
    """Cartesian Q (count, 3) on the reciprocal lattice of the L×L×L supercell, |Q| ≈ 2–9 Å⁻¹."""
    recip = 2 * np.pi * np.linalg.inv(np.array(model.primitive.cell[:])).T  # rows b_i
    out = []
    while len(out) < count:
        n = rng.integers(-4 * L, 4 * L + 1, size=3)
        qc = (n / L) @ recip
        if not 2 < np.linalg.norm(qc) < 9:
            continue
        if not allow_gamma and np.all(n % L == 0):
            continue
        out.append(qc)
    return torch.as_tensor(np.array(out))


def dense_intensity(dense, cov, q, symbols):
    """(1/N) Σ_jk f_j f_k cos(Q·(R_j − R_k)) e^{−W_j−W_k} (exp(Q·C_jk·Q) − 1), W_j = ½ Q·C_jj·Q."""
    out = []
    for qi in np.asarray(q):
        x = np.einsum("a,jakb,b->jk", qi, cov, qi)
        w = 0.5 * np.diag(x)
        f = xraydb_f(symbols, np.array([np.linalg.norm(qi)]))[0]
        a = f[[symbols.index(s) for s in dense.symbols]] * np.exp(-w)
        phase = dense.positions @ qi
        cos_diff = np.cos(phase[:, None] - phase[None, :])
        out.append((a[:, None] * a[None, :] * cos_diff * np.expm1(x)).sum() / dense.n_atoms)
    return np.array(out)


def _gaussian_vs_dense(models, name, L, statistics, q):  # noqa: F811
    model = models[name]
    dense = dense_supercell(model, L)
    tds = tds_model(model, T_ROOM, method="gaussian", statistics=statistics, grid=(L, L, L), refine=False)
    with torch.no_grad():
        ours = tds(q).numpy()
    symbols = sorted(set(dense.symbols))
    ref = dense_intensity(dense, dense.covariance(T_ROOM, statistics), q, symbols)
    err = relative_error(ours, ref)
    print(f"{name} L={L} {statistics}: gaussian vs dense {dense.n_atoms}-atom supercell sum, "
          f"max relative {err:.1e} (I from {ref.min():.3g} to {ref.max():.3g} e.u.)")
    assert err < 1e-6


# Bragg positions in hkl of each model's unit cell (NaCl's is its primitive cell): fundamental and, for
# the compounds, reflections where atoms scatter with opposite phases
BRAGG_HKL = {"Ni": [(2, 0, 0), (1, 1, 1)], "NaCl": [(1, 1, 1), (2, 0, 0), (1, 0, 0)],
             "AuCu3": [(1, 0, 0), (1, 1, 0), (2, 0, 0)]}


@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize("name, L", [("Ni", 5), ("NaCl", 4), ("AuCu3", 3)])
def test_gaussian_equals_dense_supercell_sum(models, name, L, statistics, rng):  # noqa: F811
    """All orders, Q commensurate with the grid and Bragg positions G (including superstructure
    reflections), one grid (refine=False): the gaussian model is then the exact periodic L×L×L supercell, so it
    must equal the brute-force double sum over its atoms with C = k_BT M^{-1/2} D⁺ M^{-1/2} (or the
    quantum mode sum), translations removed."""
    model = models[name]
    q = model_commensurate_q(model, L, rng, 10)
    q = torch.cat([q, torch.as_tensor(model.q_from_hkl(BRAGG_HKL[name]))])
    _gaussian_vs_dense(models, name, L, statistics, q)



# ----------------------------------------------------------------------------- gaussian: grid and physics
def random_directions(rng, count):
    d = rng.normal(size=(count, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def test_multi_phonon_share_for_nickel(models, rng):  # noqa: F811
    """Ni, 300 K, quantum, |Q| = 7 Å⁻¹, 40 directions, grid 15³: the multi-phonon share 1 − I₁/I.
    The design expects 10–20 %. An uncorrelated (Einstein) estimate gives (e^{2W} − 1 − 2W)/(e^{2W} − 1) ≈ W ≈ 10 %
    with 2W = Q²⟨u_x²⟩ ≈ 0.22; correlations of neighbours raise it. Near Bragg peaks the one-phonon
    term dominates, so single directions may fall lower: the median must lie in 10–20 %, the 10th–90th
    percentiles in 5–25 %."""
    model = models["Ni"]
    q = 7.0 * random_directions(rng, 40)
    with torch.no_grad():
        total = tds_model(model, T_ROOM, method="gaussian", statistics="quantum", grid=(15, 15, 15))(q).numpy()
        first = tds_model(model, T_ROOM, method="one-phonon", statistics="quantum")(q).numpy()
    share = 1 - first / total
    p10, p50, p90 = np.percentile(share, [10, 50, 90])
    print(f"multi-phonon share at |Q| = 7 Å⁻¹: median {p50:.3f}, 10–90 % {p10:.3f}–{p90:.3f}")
    assert 0.10 <= p50 <= 0.20
    assert 0.05 <= p10 and p90 <= 0.25 and share.min() > 0


@pytest.mark.parametrize("method", ["one-phonon", "gaussian"])
def test_quantum_tends_to_classical_at_high_temperature(models, method, rng):  # noqa: F811
    """quantum/classical → 1 as T grows, within 1 % at 3000 K, |ratio − 1| falling monotonically.
    The ratio may end slightly below 1 at large Q: the quantum ⟨u²⟩ exceeds the classical by ~ħ²/12mk_BT
    (∝ 1/T, a stronger Debye–Waller damping) while coth x − 1/x ≈ x/3 raises C̃ only ∝ 1/T². With the
    amplitudes A_κ held fixed, C̃ alone gives a ratio > 1 falling monotonically to 1."""
    model = models["Ni"]
    q = model.q_from_hkl(rng.uniform(-2.5, 2.5, size=(15, 3)))
    temperatures = (300.0, 1000.0, 3000.0)
    ratios, kernel = [], []
    amp = torch.full((len(q), 1), 20.0, dtype=torch.float64)
    for t in temperatures:
        with torch.no_grad():
            i_q, i_c = (tds_model(model, t, method=method, statistics=s, dw_mesh=4, grid=(7, 7, 7))(q).numpy()
                        for s in ("quantum", "classical"))
            k_q, k_c = (one_phonon_intensity(ThermalCovariance(model, t, s), torch.as_tensor(q), amp).numpy()
                        for s in ("quantum", "classical"))
        ratios.append(i_q / i_c)
        kernel.append(k_q / k_c)
    dev, kernel = np.abs(np.array(ratios) - 1), np.array(kernel)
    print(f"{method}: max |quantum/classical − 1| at {temperatures} K: {dev.max(axis=1)}")
    assert np.all(dev[:-1] > dev[1:]) and dev[-1].max() < 0.01
    assert np.all(kernel > 1) and np.all(kernel[:-1] > kernel[1:]) and np.abs(kernel[-1] - 1).max() < 0.01


def test_low_temperature_limits(models, rng):  # noqa: F811
    """T → 0: classical I₁ → 0 linearly (I(2T)/I(T) → 2); quantum → a finite zero-point value, reached
    smoothly, below the 300 K value; T = 0 is accepted for quantum statistics only."""
    model = models["Ni"]
    q = model.q_from_hkl(rng.uniform(-2.5, 2.5, size=(15, 3)))

    def run(t, statistics, method="one-phonon"):
        with torch.no_grad():
            return tds_model(model, t, method=method, statistics=statistics, dw_mesh=4, grid=(5, 5, 5))(q).numpy()

    small, double = run(0.01, "classical"), run(0.02, "classical")
    assert np.abs(double / small - 2).max() < 1e-3
    for method in ("one-phonon", "gaussian"):
        zero = run(0.0, "quantum", method)
        assert np.all(np.isfinite(zero)) and np.all(zero > 0)
        assert np.abs(run(1.0, "quantum", method) / zero - 1).max() < 1e-3
        assert np.all(zero < run(300.0, "quantum", method))


# ----------------------------------------------------------------------------- gradients
# conventional-cell hkl of fcc Ni: X (degenerate TA), W, L (degenerate TA), Γ–X, a general point, Bragg G
NI_HKL = {"X": (1, 0, 0), "W": (2, 1, 0), "L": (1.5, 1.5, 1.5), "Γ–X": (2.3, 0, 0), "general": (0.3, 1.2, 2.1)}


@pytest.mark.parametrize("method, statistics", [("one-phonon", "classical"), ("one-phonon", "quantum"),
                                                ("gaussian", "classical"), ("gaussian", "quantum")])
def test_gradients_match_finite_differences(models, method, statistics):  # noqa: F811
    """torch.autograd.gradcheck of I(Q; θ) (all 16 θ of 5-shell Ni), including exactly degenerate modes at
    X and L (where autograd through eigh would be wrong) and, for gaussian, a Bragg position."""
    model = copy.deepcopy(models["Ni"])
    # the transverse acoustic pair is exactly degenerate at X and L
    ta = model.frequencies(model.q_from_hkl([NI_HKL["X"], NI_HKL["L"]]))[:, :2]
    assert np.abs(ta[:, 1] - ta[:, 0]).max() < 1e-9 and ta.min() > 1
    tds = tds_model(model, T_ROOM, method=method, statistics=statistics, dw_mesh=3, grid=(5, 5, 5),
                   form_factors={"Ni": 1.0})
    hkl = list(NI_HKL.values()) + ([(2, 0, 0)] if method == "gaussian" else [])
    q = torch.as_tensor(model.q_from_hkl(hkl))
    theta0 = model.theta.detach().clone().requires_grad_(True)

    def intensity(theta):
        return torch.func.functional_call(tds, {"force_constants.theta": theta}, (q,))

    assert torch.autograd.gradcheck(intensity, (theta0,), eps=1e-6, atol=1e-9, rtol=1e-5)


def test_gradients_match_finite_differences_compound(models):  # noqa: F811
    """AuCu3 (14 θ, two masses): quantum one-phonon and classical gaussian at M (½,½,0), R (½,½,½) and a
    general point."""
    model = copy.deepcopy(models["AuCu3"])
    q = torch.as_tensor(model.q_from_hkl([(0.5, 0.5, 0), (1.5, 0.5, 0.5), (0.3, 1.2, 2.1)]))
    theta0 = model.theta.detach().clone().requires_grad_(True)
    for method, statistics in [("one-phonon", "quantum"), ("gaussian", "classical")]:
        tds = tds_model(model, T_ROOM, method=method, statistics=statistics, dw_mesh=2, grid=(3, 3, 3),
                       form_factors={"Au": 1.0, "Cu": 0.4})

        def intensity(theta):
            return torch.func.functional_call(tds, {"force_constants.theta": theta}, (q,))

        assert torch.autograd.gradcheck(intensity, (theta0,), eps=1e-6, atol=1e-9, rtol=1e-5)


# ----------------------------------------------------------------------------- errors
def test_bad_arguments_raise_value_errors(models):  # noqa: F811
    model = models["Ni"]
    with pytest.raises(ValueError, match="method"):
        tds_model(model, T_ROOM, method="two-phonon")
    with pytest.raises(ValueError, match="statistics"):
        tds_model(model, T_ROOM, statistics="bose")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            tds_model(model, bad)
    with pytest.raises(ValueError, match="temperature"):
        tds_model(model, 0.0, statistics="classical")
    tds_model(model, 0.0, statistics="quantum")  # zero point: allowed
    with pytest.raises(ValueError, match="sampler"):
        tds_model(model, T_ROOM, method="sampling")
    with pytest.raises(ValueError, match="form factors"):
        tds_model(model, T_ROOM, form_factors={"Fe": 26.0})


@pytest.mark.parametrize("statistics", STATISTICS)
def test_unstable_force_constants_raise_unstable_error(models, statistics):  # noqa: F811
    """Negative 1XX: D(q) is not positive definite; one-phonon (model and kernel) says so."""
    model = copy.deepcopy(models["Ni"])
    theta = model.parameter_dict()
    theta["1XX"] = -theta["1XX"]
    model.set_from_bvk(theta)
    q = torch.as_tensor(model.q_from_hkl([[1, 0, 0], [0.5, 0.5, 0.5], [0.3, 1.2, 2.1]]))
    with pytest.raises(UnstableError):
        tds_model(model, T_ROOM, method="one-phonon", statistics=statistics, dw_mesh=3)(q)
    amp = torch.full((len(q), 1), 20.0, dtype=torch.float64)  # the kernel alone, without a Debye–Waller mesh
    with pytest.raises(UnstableError):
        one_phonon_intensity(ThermalCovariance(model, T_ROOM, statistics), q, amp)


def test_fixed_theta_cache_follows_theta(models, rng):  # noqa: F811
    """Without gradients the Debye–Waller mesh and the real-space covariance are kept per θ: a θ change
    must be seen (equal to a fresh model), and with gradients the cached values must not be used."""
    model = copy.deepcopy(models["Ni"])
    q = 5.0 * random_directions(rng, 8)
    tds = tds_model(model, T_ROOM, method="gaussian", statistics="quantum", dw_mesh=4, grid=(5, 5, 5))
    with torch.no_grad():
        first = tds(q)
        model.theta.mul_(1.1)
        changed = tds(q)
        fresh = tds_model(model, T_ROOM, method="gaussian", statistics="quantum", dw_mesh=4, grid=(5, 5, 5))(q)
    assert relative_error(changed, fresh) < 1e-13
    assert relative_error(changed, first) > 1e-3
    model.theta.grad = None
    tds(q).sum().backward()  # the graph runs through the Debye–Waller factors and the higher orders
    reference = tds_model(model, T_ROOM, method="gaussian", statistics="quantum", dw_mesh=4, grid=(5, 5, 5))
    grad = model.theta.grad.clone()
    model.theta.grad = None
    reference(q).sum().backward()
    assert torch.allclose(grad, model.theta.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("statistics", ["classical", "quantum"])
def test_chunks_in_worker_threads_equal_one_block(models, rng, statistics):  # noqa: F811
    """AuCu3 gaussian in chunks of 3 Q (several worker threads) against one block in the calling thread:
    same values and θ-gradient; no graph where the caller has none; an unstable θ raised from a worker;
    the caller's torch thread count untouched; the gradient bitwise the same on every call. Likewise the mesh
    sums (Debye–Waller, real-space grid)."""
    model = copy.deepcopy(models["AuCu3"])
    q = torch.as_tensor(5.0 * random_directions(rng, 11))
    options = dict(method="gaussian", statistics=statistics, dw_mesh=2, grid=(3, 3, 3))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        values, grads = [], []
        for chunk in (3, 64):
            model.theta.grad = None
            value = tds_model(model, T_ROOM, chunk=chunk, **options)(q)
            value.sum().backward()
            values.append(value.detach())
            grads.append(model.theta.grad.clone())
        chunked = tds_model(model, T_ROOM, chunk=3, **options)
        for _ in range(4):  # the same gradient to the last bit on every call (a fixed chunk-to-thread assignment)
            model.theta.grad = None
            chunked(q).sum().backward()
            assert torch.equal(model.theta.grad, grads[0])
        with torch.no_grad():
            assert not tds_model(model, T_ROOM, chunk=3, **options)(q).requires_grad
            meshes = [(ThermalCovariance(model, T_ROOM, statistics).mean_square_displacement((3, 3, 3), chunk=chunk),
                       ThermalCovariance(model, T_ROOM, statistics).real_space((3, 3, 3), chunk=chunk)[1])
                      for chunk in (5, None)]
        assert torch.get_num_threads() == 2
        with torch.no_grad():
            model.theta.mul_(-1)
        with pytest.raises(UnstableError):
            tds_model(model, T_ROOM, chunk=3, **options)(q)
    finally:
        torch.set_num_threads(threads)
    assert relative_error(values[0], values[1]) < 1e-14
    for chunked, whole in zip(*meshes):
        assert torch.abs(chunked - whole).max() < 1e-14 * torch.abs(whole).max()
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-12 * grads[1].abs().max())
