"""TDSFitted, the ASE calculator: checked against finite differences, against itself under relabelling
(atom order, supercell shape, wrapping, rigid translation), against the model's own dynamical matrix
(ASE's Phonons, Langevin Debye–Waller), against phonopy's own force-constant matrix and against the
exact energy bound of velocity Verlet."""

import copy
import itertools
import re
import warnings

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.constraints import FixCom
from ase.md import velocitydistribution
from ase.md.langevinbaoab import LangevinBAOAB
from ase.md.verlet import VelocityVerlet
from ase.phonons import Phonons

from ase_tds import ForceConstantModel, StructureError
from ase_tds.calculator import TDSFitted, __ase_plugins__
from ase_tds.io.phonopy import write_phonopy_files

# ASE ≥ 3.29 renames MaxwellBoltzmannDistribution
thermalize = getattr(velocitydistribution, "thermalize_momenta", velocitydistribution.MaxwellBoltzmannDistribution)
THZ_PER_EV = 1e-12 / (units._hplanck / units._e)  # ν (THz) = E (eV) · THZ_PER_EV


@pytest.fixture(scope="module")
def model():
    return ForceConstantModel(bulk("Ni", "fcc", a=3.52, cubic=True), shells=5).set_from_calculator(EMT(), progress=False)


@pytest.fixture(scope="module")
def calc(model):
    return TDSFitted(model)


def supercell(model, n=5):
    """n×n×n repetition of the model's primitive cell (5 is the smallest holding the 5-shell cutoff)."""
    return model.primitive.repeat(n)


def displaced(atoms, amplitude=0.05, seed=0):
    atoms = atoms.copy()
    atoms.positions += amplitude * np.random.default_rng(seed).standard_normal(atoms.positions.shape)
    return atoms


def energy_forces(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


def commensurate_q(model, n):
    """Cartesian q (n³−1, 3) Å⁻¹ of an n×n×n primitive supercell, Γ left out."""
    grid = np.array(list(itertools.product(range(n), repeat=3)))[1:] / n
    return 2 * np.pi * grid @ np.linalg.inv(model.primitive.cell[:]).T


def test_forces_are_minus_the_energy_gradient(model, calc):
    atoms = displaced(supercell(model))
    energy, forces = energy_forces(atoms, calc)
    assert energy > 0
    step = 1e-4
    rng = np.random.default_rng(1)
    for i, axis in zip(rng.choice(len(atoms), 6, replace=False), rng.integers(0, 3, 6)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, axis] += step
        minus.positions[i, axis] -= step
        slope = (energy_forces(plus, calc)[0] - energy_forces(minus, calc)[0]) / (2 * step)
        assert slope == pytest.approx(-forces[i, axis], abs=1e-8)  # exact for a quadratic, up to round-off
    # rigid translation: no energy, no force (acoustic sum rule)
    shifted = supercell(model)
    shifted.positions += [0.1, -0.2, 0.05]
    energy, forces = energy_forces(shifted, calc)
    assert abs(energy) < 1e-12 and np.abs(forces).max() < 1e-12


def test_atom_order_and_supercell_shape_do_not_matter(model, calc):
    ordered = displaced(model.unitcell.repeat(4))  # 256 atoms
    energy, forces = energy_forces(ordered, calc)

    order = np.random.default_rng(2).permutation(len(ordered))
    permuted = ordered[order]
    e_perm, f_perm = energy_forces(permuted, calc)
    assert e_perm == pytest.approx(energy, rel=1e-12)
    np.testing.assert_allclose(f_perm, forces[order], rtol=0, atol=1e-12)

    # the same lattice in a sheared cell: supercell matrix [[4,4,0],[0,4,0],[0,0,4]] of the cubic cell
    sheared = permuted.copy()
    sheared.set_cell(np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]]) @ ordered.cell[:], scale_atoms=False)
    sheared.wrap()
    assert np.abs(sheared.positions - permuted.positions).max() > 1.0  # atoms really moved by lattice vectors
    e_shear, f_shear = energy_forces(sheared, calc)
    assert e_shear == pytest.approx(energy, rel=1e-12)
    np.testing.assert_allclose(f_shear, forces[order], rtol=0, atol=1e-12)


def test_wrapping_changes_nothing(model, calc):
    atoms = displaced(supercell(model), seed=3)
    atoms.positions[0] = [-0.07, -0.03, 0.05]  # atom 0's site is the origin: it now lies outside the cell
    energy, forces = energy_forces(atoms, calc)
    wrapped = atoms.copy()
    wrapped.wrap()
    assert np.abs(wrapped.positions - atoms.positions).max() > 5.0
    e_wrap, f_wrap = energy_forces(wrapped, calc)
    assert e_wrap == pytest.approx(energy, rel=1e-12)
    np.testing.assert_allclose(f_wrap, forces, rtol=0, atol=1e-12)


def test_reference_translates_the_lattice(model, calc):
    atoms = displaced(supercell(model), seed=4)
    energy, forces = energy_forces(atoms, calc)
    shift = np.array([0.3, 0.7, -1.1])
    reference = supercell(model)
    reference.positions += shift
    moved = atoms.copy()
    moved.positions += shift
    e_moved, f_moved = energy_forces(moved, TDSFitted(model, reference=reference))
    assert e_moved == pytest.approx(energy, rel=1e-12)
    np.testing.assert_allclose(f_moved, forces, rtol=0, atol=1e-12)
    with pytest.raises(StructureError, match="not the force constants' crystal"):
        TDSFitted(model, reference=bulk("Cu", "fcc", a=3.61))


def test_folder_source_equals_model_source(model, calc, tmp_path):
    write_phonopy_files(model, tmp_path)  # phonopy_params.yaml, as `ase-tds fit` writes it
    from_folder = TDSFitted(tmp_path)
    assert from_folder.model.n_params == model.n_params  # zero shells beyond the cutoff are dropped
    atoms = displaced(supercell(model), seed=5)
    e_model, f_model = energy_forces(atoms, calc)
    e_folder, f_folder = energy_forces(atoms, from_folder)
    assert e_folder == pytest.approx(e_model, rel=1e-9)
    np.testing.assert_allclose(f_folder, f_model, rtol=0, atol=1e-9)
    with pytest.raises(FileNotFoundError, match="phonopy_params.yaml"):
        TDSFitted(tmp_path / "elsewhere")
    with pytest.raises(TypeError, match="expected a ForceConstantModel"):
        TDSFitted({"theta": [1.0]})


def test_ase_phonons_reproduce_the_model_frequencies(model, calc, tmp_path):
    """ASE's finite displacements on a 6×6×6 primitive supercell (X and L are commensurate with it)."""
    phonons = Phonons(model.primitive.copy(), calc, supercell=(6, 6, 6), delta=0.01, name=str(tmp_path / "phonon"))
    phonons.run()
    phonons.read(acoustic=True)
    hkl = np.array([[0, 1, 0], [0.5, 0.5, 0.5]])  # X, L in the cubic cell's reciprocal-lattice units
    q = model.q_from_hkl(hkl)
    scaled = q @ model.primitive.cell[:].T / (2 * np.pi)
    ase_thz = np.sort(phonons.band_structure(scaled, verbose=False).real, axis=1) * THZ_PER_EV
    np.testing.assert_allclose(ase_thz, model.frequencies(q), rtol=0, atol=1e-3)


def test_velocity_verlet_energy_stays_within_its_exact_bound(model, calc):
    """Velocity Verlet on a harmonic crystal conserves, mode by mode, H̃ = ½v² + ½ω²x²(1 − (hω)²/4)
    exactly; the true energy E = H̃ + (h²ω⁴/8)x² then lies in [H̃, H̃(1 + c)] with
    c = (hω)²/4 / (1 − (hω)²/4). Started at the ideal positions (x = 0, E(0) = H̃), every later energy
    obeys 0 ≤ E(t) − E(0) ≤ c(ω_max) E(0): no drift, a bounded oscillation (c ≈ 1.0e-3 for Ni at 1 fs)."""
    n, step_fs = 5, 1.0
    atoms = supercell(model, n)
    atoms.calc = calc
    thermalize(atoms, temperature_K=300, rng=np.random.default_rng(6))
    velocitydistribution.Stationary(atoms)
    e0 = atoms.get_total_energy()
    energies = []
    dyn = VelocityVerlet(atoms, timestep=step_fs * units.fs)
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dyn.run(1000)

    omega_max = 2 * np.pi * model.frequencies(commensurate_q(model, n)).max() * 1e-3  # rad/fs
    x = (step_fs * omega_max) ** 2 / 4
    bound = x / (1 - x)
    change = (np.array(energies) - e0) / e0
    assert change.min() > -1e-12
    assert change.max() <= bound
    assert change.max() > 0.2 * bound  # the bound is tight, not vacuous


def test_langevin_displacements_match_the_classical_debye_waller(model, calc):
    """⟨|u|²⟩ per atom from BAOAB Langevin (exact configurational sampling for a harmonic system, at any
    stable time step) against k_BT/N Σ_q tr M^{-1/2} D(q)^{-1} M^{-1/2} over the same supercell's
    q grid without Γ (the centre of mass is held fixed)."""
    n, temperature = 5, 300.0
    q = commensurate_q(model, n)
    dyn_inv = np.linalg.inv(model.dynamical_matrix(q).detach().numpy())  # (n³−1, 3, 3) amu Å²/eV
    expected = units.kB * temperature / n**3 * np.trace(dyn_inv.sum(axis=0)).real / model.primitive.get_masses()[0]

    atoms = supercell(model, n)
    atoms.calc = calc
    atoms.set_constraint(FixCom())
    rng = np.random.default_rng(7)
    thermalize(atoms, temperature_K=temperature, rng=rng)
    velocitydistribution.Stationary(atoms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "LangevinBAOAB has not been tested with constraints"
        dyn = LangevinBAOAB(atoms, 8 * units.fs, temperature_K=temperature, T_tau=50 * units.fs, rng=rng)
    dyn.run(300)  # 2.4 ps: many relaxation times 1/γ = 50 fs
    samples = []
    dyn.attach(lambda: samples.append(np.mean(np.sum(calc.displacements(atoms)[0] ** 2, axis=1))), interval=2)
    dyn.run(8000)

    samples = np.array(samples)
    blocks = samples[: len(samples) // 20 * 20].reshape(20, -1).mean(axis=1)
    error = blocks.std(ddof=1) / np.sqrt(len(blocks))  # standard error of the mean from 20 blocks
    decorrelated = samples.var() / error**2  # effective number of independent samples
    assert decorrelated > 200 and error < 0.01 * expected  # the run is long enough for a 1 % test
    assert abs(samples.mean() - expected) < 4 * error


def test_stress_is_not_implemented(model, calc):
    atoms = supercell(model)
    atoms.calc = calc
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


@pytest.mark.parametrize("change, fragment", [
    (lambda a: a.symbols.__setitem__(7, "Cu"), "wrong species"),
    (lambda a: a.positions.__setitem__(7, a.positions[7] + [1.2, 0, 0]), "no lattice site"),
    (lambda a: a.set_cell(a.cell[:] * 1.01, scale_atoms=True), "not a supercell"),
    (lambda a: a.pop(7), "lattice sites"),
    (lambda a: a.set_pbc([True, True, False]), "periodic"),
])
def test_bad_structures_are_refused(model, calc, change, fragment):
    atoms = supercell(model)
    change(atoms)
    atoms.calc = calc
    with pytest.raises(StructureError, match=fragment):
        atoms.get_forces()


@pytest.mark.parametrize("small", [(2, 2, 2), (3, 2, 4), (1, 1, 1)])
def test_a_supercell_shorter_than_the_cutoff_is_the_periodic_one(model, calc, small):
    """Any supercell, also one shorter than twice the 5.83 Å cutoff (a 3×3×3 cubic Ni cell is 10.56 Å): its
    forces and energy are those of the same displacement pattern repeated through a supercell that holds the
    cutoff (independent: no image is summed there), which is what a periodic small supercell is."""
    cubic = bulk("Ni", "fcc", a=3.52, cubic=True)
    atoms = displaced(cubic.repeat(small), seed=3)
    repeat = tuple(int(np.ceil(12 / (3.52 * n))) for n in small)  # big: ≥ 12 Å > 2 × 5.83 Å in each direction
    big = atoms.repeat(repeat)
    energy, forces = energy_forces(atoms, calc)
    big_energy, big_forces = energy_forces(big, calc)
    assert energy == pytest.approx(big_energy / np.prod(repeat), rel=1e-10)
    np.testing.assert_allclose(np.tile(forces, (np.prod(repeat), 1)), big_forces, atol=1e-12)


def test_bad_tolerance_is_refused(model):
    with pytest.raises(ValueError, match="tolerance must lie between"):
        TDSFitted(model, tolerance=1.5)


def test_large_displacement_warns(model, calc):
    atoms = supercell(model)
    atoms.positions[3] += [0.6, 0, 0]
    atoms.calc = calc
    with pytest.warns(UserWarning, match="warn_displacement"):
        atoms.get_forces()


def test_plugin_declares_the_calculator():
    plugin = pytest.importorskip("ase._4.plugins.plugin")
    (entry,) = __ase_plugins__
    assert isinstance(entry, plugin.CalculatorPlugin)
    assert entry.implementation is TDSFitted


def test_external_phonopy_force_constants_agree_with_phonopy_own_matrix(emt_ni_phonopy):
    """Force constants from phonopy's own finite displacements (EMT Ni, 4×4×4 cubic supercell) used as
    they come: on phonopy's supercell, F = −Φu with phonopy's full matrix. The calculator keeps the shells
    below half the supercell (7.04 Å) and drops the folded pair at that distance; EMT force constants that
    far out are < 1e-4 eV/Å², so forces differ by ~1e-5 eV/Å for 0.05 Å displacements."""
    ph = emt_ni_phonopy
    calc = TDSFitted(ph)
    sc = ph.supercell
    atoms = displaced(Atoms(sc.symbols, cell=sc.cell, positions=sc.positions, pbc=True), seed=8)
    full = ph.force_constants
    assert full.shape == (len(sc), len(sc), 3, 3)
    hessian = full.transpose(0, 2, 1, 3).reshape(3 * len(sc), 3 * len(sc))
    u = (atoms.positions - sc.positions).ravel()
    energy, forces = energy_forces(atoms, calc)
    assert np.abs(forces.ravel() + hessian @ u).max() < 1e-4 * np.abs(forces).max()
    assert energy == pytest.approx(0.5 * u @ hessian @ u, rel=1e-4)


def test_unstable_force_constants_warn(model, tmp_path):
    """Force constants with imaginary modes give negative energies: TDSFitted says so, naming the source."""
    unstable = copy.deepcopy(model).set_parameters(-model.theta.detach())
    with pytest.warns(UserWarning, match="dynamically unstable"):
        TDSFitted(unstable)
    write_phonopy_files(unstable, tmp_path)
    with pytest.warns(UserWarning, match=re.escape(f"{tmp_path}: the force constants are dynamically unstable")):
        TDSFitted(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TDSFitted(model)
