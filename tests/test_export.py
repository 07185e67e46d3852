"""MLIP training data: extxyz read-back, forces −Φu, and the sampled ⟨u uᵀ⟩ against the exact covariance.

The reference Hessian is phonopy's full force-constant array of the supercell (compact_fc_to_full_fc)
and the reference covariance its eigen-decomposition — neither TDSFitted nor the Cholesky samplers.
"""

import numpy as np
import pytest
from ase import units
from ase.calculators.emt import EMT
from ase.io import read
from phonopy.harmonic.force_constants import compact_fc_to_full_fc

from ase_tds import ForceConstantModel, TDSFitted, __version__, write_training_data
from ase_tds.export import thermal_configurations
from ase_tds.structure import StructureError

from conftest import cu3au

SUPERCELL = (2, 2, 2)  # 32 atoms of Cu3Au; its shortest translation 7.5 Å holds the 3.2 Å cutoff
N_SAMPLES = 1500


@pytest.fixture(scope="module")
def model():
    return ForceConstantModel(cu3au(), shells=1).set_from_calculator(EMT(), progress=False)


@pytest.fixture(scope="module")
def reference(model):
    """(ideal positions (N, 3) Å in the export's atom order, masses (N,) amu, Φ (3N, 3N) eV/Å²) from phonopy."""
    ideal = model.unitcell.repeat(SUPERCELL)
    ph = model.to_phonopy(np.diag(SUPERCELL))
    full = compact_fc_to_full_fc(ph.primitive, ph.force_constants)
    frac = ideal.get_scaled_positions()
    theirs = ph.supercell.scaled_positions
    diff = frac[:, None, :] - theirs[None, :, :]
    order = np.argmin(np.abs(diff - np.round(diff)).sum(-1), axis=1)  # phonopy's index of each of our atoms
    assert len(set(order)) == len(ideal)
    hessian = full[np.ix_(order, order)].transpose(0, 2, 1, 3).reshape(3 * len(ideal), 3 * len(ideal))
    return ideal.positions, ideal.get_masses(), hessian


def displacements(frames, ideal):
    """u (S, N, 3) Å: positions minus ideal sites, wrapped into the periodic supercell."""
    cell = np.array(frames[0].cell[:])
    frac = (np.array([f.positions for f in frames]) - ideal) @ np.linalg.inv(cell)
    return (frac - np.round(frac)) @ cell


def exact_covariance(masses, hessian, temperature, statistics):
    """⟨u uᵀ⟩ (3N, 3N) Å² of the periodic supercell with its centre of mass fixed, by eigen-decomposition."""
    inv_sqrt_m = 1 / np.sqrt(np.repeat(masses, 3))
    lam, vec = np.linalg.eigh(hessian * inv_sqrt_m[:, None] * inv_sqrt_m[None, :])
    assert np.abs(lam[:3]).max() < 1e-10 and lam[3] > 1e-3  # three translations, then a stable crystal
    lam, vec = lam[3:], vec[:, 3:]
    kt = units.kB * temperature
    if statistics == "classical":
        per_mode = kt / lam
    else:
        hbar_omega = units._hbar * np.sqrt(lam * units._e / (1e-20 * units._amu)) / units._e  # eV
        per_mode = 0.5 * hbar_omega / np.tanh(hbar_omega / (2 * kt)) / lam
    root = inv_sqrt_m[:, None] * vec * np.sqrt(per_mode)  # C = root rootᵀ
    return root @ root.T, root


@pytest.mark.parametrize("statistics, sampler", [("classical", "dense"), ("classical", "qspace"),
                                                  ("quantum", "qspace")])
def test_sampled_covariance_matches_the_exact_one(model, reference, tmp_path, statistics, sampler):
    ideal, masses, hessian = reference
    temperature = 300.0 if statistics == "classical" else 100.0
    path = write_training_data(model, tmp_path / "train.extxyz", SUPERCELL, temperature, N_SAMPLES,
                               statistics=statistics, seed=11, sampler=sampler, progress=False)
    u = displacements(read(path, ":"), ideal).reshape(N_SAMPLES, -1)
    assert np.abs(u.reshape(N_SAMPLES, -1, 3).transpose(0, 2, 1) @ masses).max() < 1e-5  # centre of mass fixed

    exact, root = exact_covariance(masses, hessian, temperature, statistics)
    sampled = u.T @ u / N_SAMPLES  # the mean is known to be zero
    # each entry: Var(ĉ_ij) = (C_ij² + C_ii C_jj)/S for Gaussian u; 5σ over 4656 distinct entries
    sigma = np.sqrt((exact**2 + np.outer(np.diag(exact), np.diag(exact))) / N_SAMPLES)
    assert np.max(np.abs(sampled - exact) / sigma) < 5
    # whitened: Σ_s |y_s|² ~ χ²(S·d), d = 3N − 3 modes; 5σ is a 1.9 % bound on the overall amplitude²
    y = np.linalg.lstsq(root, u.T, rcond=None)[0]
    chi2, dof = float((y**2).sum()), y.size
    assert abs(chi2 - dof) < 5 * np.sqrt(2 * dof)
    # and each mode's variance: χ²(S)/S, 5σ = ±18 %
    assert np.abs((y**2).mean(axis=1) - 1).max() < 5 * np.sqrt(2 / N_SAMPLES)


def test_read_back_forces_energy_and_metadata(model, reference, tmp_path):
    ideal, _, hessian = reference
    frames = list(thermal_configurations(model, SUPERCELL, 300.0, 20, seed=3, progress=False))
    path = write_training_data(model, tmp_path / "train.extxyz", SUPERCELL, 300.0, 20, seed=3, progress=False)
    back = read(path, ":")
    assert len(back) == 20
    for ours, theirs in zip(frames, back):
        np.testing.assert_allclose(theirs.positions, ours.positions, rtol=0, atol=1e-8)  # 8 decimals in the file
        np.testing.assert_allclose(theirs.cell[:], ours.cell[:], rtol=0, atol=1e-12)
        assert theirs.get_chemical_symbols() == ours.get_chemical_symbols()
        assert theirs.info["REF_energy"] == ours.info["REF_energy"] == theirs.get_potential_energy()
        np.testing.assert_allclose(theirs.arrays["REF_forces"], ours.arrays["REF_forces"], rtol=0, atol=1e-8)
        np.testing.assert_array_equal(theirs.get_forces(), theirs.arrays["REF_forces"])
        assert theirs.info["temperature"] == 300.0 and theirs.info["statistics"] == "classical"
        assert theirs.info["supercell"].tolist() == list(SUPERCELL)
        assert theirs.info["ase_tds_version"] == __version__ and theirs.info["source"] == repr(model)

    u = displacements(back, ideal).reshape(len(back), -1)
    forces = np.array([f.arrays["REF_forces"].ravel() for f in back])
    energies = np.array([f.info["REF_energy"] for f in back])
    np.testing.assert_allclose(forces, -u @ hessian, rtol=0, atol=1e-6)  # F = −Φu, phonopy's Φ
    np.testing.assert_allclose(energies, 0.5 * np.einsum("si,ij,sj->s", u, hessian, u), rtol=1e-6)
    assert np.ptp(energies) > 0.1  # thermal: ~(3N−3)/2 k_BT = 1.2 eV, fluctuating
    calc = TDSFitted(model)
    for frame in back:
        np.testing.assert_allclose(calc.get_forces(frame.copy()), frame.arrays["REF_forces"], rtol=0, atol=1e-7)


def test_keys_are_configurable(model, tmp_path):
    path = write_training_data(model, tmp_path / "t.extxyz", SUPERCELL, 300.0, 2, energy_key="DFT_energy",
                               forces_key="DFT_forces", also_plain=False, seed=1, progress=False)
    frame = read(path, ":")[0]
    assert frame.calc is None and "DFT_energy" in frame.info and "DFT_forces" in frame.arrays
    path = write_training_data(model, tmp_path / "t.extxyz", SUPERCELL, 300.0, 2, energy_key="energy",
                               forces_key="forces", also_plain=False, seed=1, progress=False)
    frame = read(path, ":")[0]
    assert frame.get_potential_energy() != 0 and "energy" not in frame.info and frame.get_forces().shape == (32, 3)


@pytest.mark.parametrize("change, error, message", [
    (dict(temperature=-5.0), ValueError, "temperature must be > 0"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(supercell=(2, 2)), ValueError, "three positive integers"),
    (dict(supercell=(2, 0, 2)), ValueError, "three positive integers"),
    (dict(supercell=(2.5, 2, 2)), ValueError, "three positive integers"),
    (dict(n_samples=0), ValueError, "n_samples must be a positive integer"),
    (dict(n_samples=1.5), ValueError, "n_samples must be a positive integer"),
    (dict(statistics="quantal"), ValueError, "statistics must be"),
    (dict(energy_key="my energy"), ValueError, "energy_key must be a name"),
    (dict(forces_key="positions"), ValueError, "forces_key must be a name"),
    (dict(energy_key="E", forces_key="E"), ValueError, "must differ"),
    (dict(path="{tmp}"), IsADirectoryError, "is a folder"),
    (dict(path="{tmp}/missing/t.extxyz"), FileNotFoundError, "no such folder"),
])
def test_bad_input_is_refused_and_nothing_is_written(model, tmp_path, change, error, message):
    arguments = dict(path=str(tmp_path / "t.extxyz"), supercell=SUPERCELL, temperature=300.0, n_samples=3)
    arguments.update(change)
    arguments["path"] = arguments["path"].format(tmp=tmp_path)
    with pytest.raises(error, match=message):
        write_training_data(model, progress=False, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_the_old_file(model, tmp_path):
    path = tmp_path / "t.extxyz"
    path.write_text("old")
    # at 10⁶ K the atoms leave their lattice sites: TDSFitted refuses the first frame
    with pytest.raises(StructureError, match="nearest lattice site"):
        write_training_data(model, path, SUPERCELL, 1e6, 5, seed=0, progress=False)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.extxyz"]


@pytest.mark.parametrize("sampler", ["dense", "qspace"])
def test_the_unit_cell_alone_is_a_periodic_supercell(model, sampler):
    """1×1×1 (4 atoms of Cu3Au, 3.75 Å, shorter than twice the cutoff): frames of that periodic crystal, whose
    forces are those of the same pattern repeated 2×2×2 (a supercell that holds the cutoff: no image summed)."""
    frames = list(thermal_configurations(model, (1, 1, 1), 300.0, 3, seed=1, sampler=sampler, progress=False))
    calc = TDSFitted(model)
    for frame in frames:
        big = frame.copy()
        big.calc = None
        big = big.repeat(2)
        big.calc = calc
        assert frame.get_potential_energy() == pytest.approx(big.get_potential_energy() / 8, rel=1e-10)
        np.testing.assert_allclose(np.tile(frame.get_forces(), (8, 1)), big.get_forces(), atol=1e-12)
