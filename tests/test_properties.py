"""Phonon properties with error bars (ase_tds.properties), `ase-tds properties` and the θ ensemble of `export`.

Independent routes: phonopy's thermal properties and thermal displacement matrices computed here from the model's
phonopy files (phonopy.load, no ase_tds in between), the classical limit 3nR of C_v, the ADPs of ThermalCovariance
against phonopy's on one mesh, and the linear propagation (J Σ Jᵀ) against an ensemble drawn from N(θ̂, Σ).
"""

import copy
import json

import numpy as np
import phonopy
import pytest
import torch
from ase.io import read

from ase_tds import ForceConstantModel, ThermalCovariance
from ase_tds.cli import main
from ase_tds.export import thermal_configurations
from ase_tds.fitting import FitResult
from ase_tds.io.phonopy import write_phonopy_files
from ase_tds.properties import (GAS_CONSTANT, PROPERTIES_FILE, mesh_along_axes, phonon_properties,
                                read_fit_folder, thermal_properties)
from ase_tds.sampling import DenseSampler

from conftest import ni_conventional

TEMPERATURES = [20.0, 100.0, 300.0, 800.0]


@pytest.fixture(scope="module")
def model():
    """fcc Ni, nearest neighbours (3 parameters), Born–von Kármán constants close to EMT's."""
    return ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59})


@pytest.fixture(scope="module")
def covariance(model):
    """A made-up Σ (eV/Å²)²: 2 % 1σ on each θ, two of them correlated (ρ = 0.6)."""
    sigma = 0.02 * np.abs(model.theta.detach().numpy())
    correlation = np.eye(3)
    correlation[0, 2] = correlation[2, 0] = 0.6
    return correlation * np.outer(sigma, sigma)


@pytest.fixture(scope="module")
def fit_folder(model, covariance, tmp_path_factory):
    """A fit folder as `ase-tds fit` leaves it, as far as the properties read it: phonopy files and fit.json."""
    folder = tmp_path_factory.mktemp("fit") / "fit"
    write_phonopy_files(model, folder)
    sigma = np.sqrt(np.diag(covariance))
    result = FitResult(labels=model.labels, theta=model.theta.detach().numpy().copy(), sigma=sigma,
                       covariance=covariance, correlation=covariance / np.outer(sigma, sigma), scale=1.0,
                       background=0.0, chi2=190.0, chi2_red=0.97, n_points=200, iterations=10,
                       settings={"method": "one-phonon", "statistics": "quantum", "temperature": 300.0})
    result.write_json(folder / "fit.json")
    return folder


@pytest.fixture(scope="module")
def phonopy_of_files(model, tmp_path_factory):
    """phonopy.Phonopy of the model's phonopy_params.yaml, loaded by phonopy itself."""
    folder = tmp_path_factory.mktemp("phonopy")
    write_phonopy_files(model, folder)
    return phonopy.load(folder / "phonopy_params.yaml", log_level=0)


def test_linear_and_ensemble_sigma_agree(model, covariance):
    props = phonon_properties(model, covariance, 300.0, temperatures=TEMPERATURES, mesh=4, ensemble=300,
                              progress=False)
    assert props.ensemble["stable"] == 300
    for name in ("heat_capacity", "entropy", "free_energy", "adp", "adp_iso"):
        assert props.agreement[name] < 0.15, (name, props.agreement)
        # and the ensemble's mean is θ̂'s value to within its own standard error (plus a little curvature)
        error = props.sigma_ensemble[name] / np.sqrt(300)
        np.testing.assert_array_less(np.abs(props.ensemble_mean[name] - props.values[name]),
                                     4 * error + 1e-9 * np.abs(props.values[name]).max())
    assert props.sigma_linear["adp_iso"][0] > 0 and props.sigma_linear["heat_capacity"][1] > 0


def test_thermal_properties_are_phonopys_and_reach_the_classical_limit(model, covariance, phonopy_of_files):
    temperatures = [50.0, 300.0, 20000.0]
    props = phonon_properties(model, covariance, 300.0, temperatures=temperatures, mesh=8, progress=False)
    ph = phonopy_of_files
    ph.run_mesh([8, 8, 8], is_gamma_center=True)
    ph.run_thermal_properties(temperatures=temperatures, exclude_gamma_acoustic=True)
    theirs = ph.thermal_properties
    for name in ("heat_capacity", "entropy", "free_energy"):
        np.testing.assert_allclose(props.values[name], getattr(theirs, name), rtol=1e-10, atol=1e-12)
    classical = 3 * model.n_atoms * GAS_CONSTANT
    # 20000 K: (ħω/k_BT)²/12 < 1e-4; the three acoustic modes at Γ left out of 8³ q: 1/8³ of the modes
    assert abs(props.values["heat_capacity"][-1] / (classical * (1 - 1 / 8**3)) - 1) < 1e-4
    # the DOS holds 3n states per primitive cell
    dos, f = props.values["dos"], props.frequency_points
    assert abs(np.sum((dos[1:] + dos[:-1]) / 2 * np.diff(f)) / (3 * model.n_atoms) - 1) < 0.01


def test_adps_of_phonopy_and_of_the_thermal_covariance_agree(model, phonopy_of_files):
    ph = phonopy_of_files
    ph.run_mesh([8, 8, 8], is_gamma_center=True, is_mesh_symmetry=False, with_eigenvectors=True)
    ph.run_thermal_displacement_matrices(temperatures=[300.0], exclude_gamma_acoustic=True)
    theirs = ph.thermal_displacement_matrices.thermal_displacement_matrices[0]
    with torch.no_grad():
        ours = ThermalCovariance(model, 300.0, "quantum").mean_square_displacement((8, 8, 8)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
    assert np.abs(ours[0] - ours[0, 0, 0] * np.eye(3)).max() < 1e-12 * ours[0, 0, 0]  # cubic site: isotropic


def test_the_automatic_mesh_is_converged(model, covariance, phonopy_of_files):
    props = phonon_properties(model, covariance, 300.0, temperatures=TEMPERATURES, progress=False)
    assert props.mesh["converged"] and props.adp_mesh["converged"]
    finer = thermal_properties(phonopy_of_files, mesh_along_axes(model.primitive.cell[:], 2 * props.mesh["points"]),
                               TEMPERATURES)
    for name, value in finer.items():
        assert np.abs(props.values[name] - value).max() < 1e-3 * np.abs(value).max(), name
    finer_adp = ThermalCovariance(model, 300.0, "quantum").converged_mean_square_displacement(
        2 * props.adp_mesh["points"]).detach().numpy()
    assert np.abs(props.values["adp"] - finer_adp).max() < 1e-3 * np.abs(finer_adp).max()
    assert props.adp_check["largest_relative_difference"] < 1e-5


def test_cli_writes_properties_into_the_fit_folder(fit_folder, capsys):
    code = main(["properties", str(fit_folder), "--temperatures", "100:300:100", "--mesh", "4", "--ensemble", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    saved = json.loads((fit_folder / PROPERTIES_FILE).read_text())
    assert saved["temperatures"] == [100.0, 200.0, 300.0] and saved["ensemble"]["members"] == 5
    assert saved["adp_temperature"] == 300.0 and saved["statistics"] == "quantum"
    assert len(saved["sigma_ensemble"]["heat_capacity"]) == 3 and saved["units"]["adp"] == "Å²"
    assert (fit_folder / "properties.png").stat().st_size > 0
    assert "U_iso(Ni) at 300 K" in out and "C_v(300 K)" in out
    again = read_fit_folder(fit_folder)
    assert again.temperature == 300.0 and again.statistics == "quantum" and again.model.n_params == 3


@pytest.mark.parametrize("args, message", [
    (["properties", "{missing}"], "no such fit folder"),
    (["properties", "{file}"], "is a file, not a fit folder"),
    (["properties", "{empty}"], "is not a fit folder: it holds no fit.json and no phonopy_params.yaml"),
    (["properties", "{broken}"], "fit.json: not a JSON fit record"),
    (["properties", "{fit}", "--temperatures", "10-100"], "--temperatures 10-100: give START:STOP:STEP"),
    (["properties", "{fit}", "--temperatures=-5,10"], "temperatures must be one or more finite numbers ≥ 0 K"),
    (["properties", "{fit}", "--mesh", "0"], "--mesh 0: give auto or"),
    (["properties", "{fit}", "--ensemble", "1"], "ensemble must be 0 (linear propagation only) or a number"),
    (["export", "{truth}", "--supercell", 1, 1, 1, "--temperature", 300, "--samples", 2, "--out", "x.extxyz",
      "--ensemble"], "is not a fit folder: it holds no fit.json"),
])
def test_bad_input_is_one_line_and_writes_nothing(fit_folder, model, tmp_path, capsys, monkeypatch, args, message):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("phonopy_params.yaml", "fit.json"):
        (broken / name).write_text((fit_folder / name).read_text() if name != "fit.json" else "{not json")
    write_phonopy_files(model, tmp_path / "truth")
    names = {"missing": tmp_path / "missing", "file": tmp_path / "a_file", "empty": tmp_path / "empty",
             "broken": broken, "fit": fit_folder, "truth": tmp_path / "truth"}
    args = [a.format(**{k: str(v) for k, v in names.items()}) if isinstance(a, str) else str(a) for a in args]
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in [*tmp_path.rglob("*"), *fit_folder.iterdir()]}
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ase-tds: error:") and message in lines[0], err
    assert {p: p.stat().st_mtime_ns for p in [*tmp_path.rglob("*"), *fit_folder.iterdir()]} == before


def test_a_fit_without_error_bars_is_refused(model):
    covariance = np.diag([1e-4, np.inf, 1e-4])
    with pytest.raises(ValueError, match="covariance of θ is not finite \\(parameters 1ZZ\\)"):
        phonon_properties(model, covariance, 300.0, mesh=4, progress=False)


def test_export_ensemble_draws_theta_from_the_fit_covariance(model, covariance):
    frames = list(thermal_configurations(model, (1, 1, 1), 300.0, 200, statistics="classical", seed=4,
                                         progress=False, covariance=covariance))
    theta = np.array([frame.info["theta"] for frame in frames])
    deviation = theta - model.theta.detach().numpy()
    # mean Mahalanobis distance² of N(θ̂, Σ) draws: n_params, standard error √(2 n_params / frames)
    distance2 = np.einsum("si,ij,sj->s", deviation, np.linalg.inv(covariance), deviation)
    assert abs(distance2.mean() - 3) < 5 * np.sqrt(6 / len(frames))
    np.testing.assert_allclose(theta.std(axis=0, ddof=1), np.sqrt(np.diag(covariance)), rtol=0.2)
    assert abs(np.corrcoef(theta.T)[0, 2] - 0.6) < 0.2
    # each frame's forces are its own θ's: −Φ(θ)u
    frame = frames[0]
    member = copy.deepcopy(model).set_parameters(frame.info["theta"])
    from ase_tds import TDSFitted

    np.testing.assert_allclose(frame.get_forces(), TDSFitted(member).get_forces(frame), rtol=1e-12, atol=1e-14)


def test_export_without_covariance_is_unchanged(model):
    frames = list(thermal_configurations(model, (1, 1, 1), 300.0, 5, statistics="classical", seed=9,
                                         progress=False))
    assert all("theta" not in frame.info for frame in frames)
    generator = torch.Generator().manual_seed(9)
    expected = DenseSampler(model, (1, 1, 1), 300.0, "classical", progress=False).sample(5, generator).detach().numpy()
    ideal = model.unitcell.positions
    np.testing.assert_allclose(np.array([f.positions for f in frames]) - ideal, expected, rtol=0, atol=1e-12)


def test_cli_export_ensemble_records_theta(fit_folder, tmp_path, capsys):
    out = tmp_path / "train.extxyz"
    code = main(["export", str(fit_folder), "--supercell", "1", "1", "1", "--temperature", "300", "--samples", "4",
                 "--out", str(out), "--seed", "1", "--ensemble"])
    assert code == 0, capsys.readouterr().err
    frames = read(out, ":")
    assert len(frames) == 4 and all(len(frame.info["theta"]) == 3 for frame in frames)
    assert len({tuple(frame.info["theta"]) for frame in frames}) == 4


@pytest.mark.parametrize("command, options", [
    ("properties", ["FITDIR", "--temperatures", "--ensemble", "--mesh", "--seed", "--device"]),
    ("export", ["--ensemble"]),
])
def test_help_names_the_options(capsys, command, options):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text
