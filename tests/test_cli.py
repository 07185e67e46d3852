"""The `ase-tds` command driven as a user would: a subprocess, real files, bad input."""

import copy
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import phonopy
import pytest
from ase.build import molecule
from ase.io import read, write

import ase_tds.plot as tds_plot
from ase_tds import ForceConstantModel, TDSData, fit, simulate
from ase_tds.background import ComptonShape
from ase_tds.fitting.checkpoint import Checkpoint
from ase_tds.cli import main
from ase_tds.fitting import FitResult
from ase_tds.io.phonopy import write_phonopy_files
from ase_tds.sampling import QSpaceSampler
from ase_tds.forward import tds_model

from conftest import ni_conventional

REPO = Path(__file__).resolve().parents[1]


def ase_tds(*args, cwd=None):
    """The command in a fresh process, importing this working tree whatever the cwd."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "ase_tds.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def in_process(capsys, *args):
    """(exit code, stderr) of the command run in this process: the same code as the subprocess, minus the start-up."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse: --help and usage errors
        code = stop.code
    return code, capsys.readouterr().err


def colour_pixels(png, colour) -> int:
    """Pixels of a PNG within 0.05 of a matplotlib colour (e.g. "C2", the third curve's)."""
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    return int((np.abs(matplotlib.image.imread(png)[..., :3] - rgb).max(-1) < 0.05).sum())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    structure = folder / "Ni.cif"
    write(structure, ni_conventional())
    truth = ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59})
    hkl = np.random.default_rng(3).uniform(-3, 3, size=(200, 3))
    data = simulate(truth, hkl, 300.0, method="one-phonon", statistics="classical")
    data.write(folder / "data.h5")
    write_phonopy_files(truth, folder / "truth")
    return folder, structure, truth


@pytest.fixture(scope="module")
def unstable(dataset, tmp_path_factory):
    """A phonopy folder of the truth with every force constant's sign flipped: all modes imaginary."""
    _, _, truth = dataset
    folder = tmp_path_factory.mktemp("unstable") / "unstable"
    write_phonopy_files(copy.deepcopy(truth).set_parameters(-truth.theta.detach()), folder)
    return folder


def drawn_figures(monkeypatch) -> list:
    """The matplotlib figures drawn from now on, kept when the plot module saves them."""
    figures, save = [], tds_plot._save
    monkeypatch.setattr(tds_plot, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))
    return figures


@pytest.fixture(scope="module")
def sampled(dataset, tmp_path_factory):
    """`ase-tds simulate --model sampling` of the truth at 150 hkl on the 1/3 grid (the default supercell, then
    3×3×3), 8 samples, seed 0: the fit's default seed, so a sampling fit's loss has its minimum at the truth."""
    folder, structure, _ = dataset
    out = tmp_path_factory.mktemp("sampled")
    hkl = np.random.default_rng(5).integers(-9, 10, size=(150, 3)) / 3
    np.savetxt(out / "grid.txt", hkl)
    code = main([str(a) for a in ("simulate", structure, "--fc", folder / "truth", "--hkl", out / "grid.txt",
                                  "--temperature", 300, "--model", "sampling", "--statistics", "classical",
                                  "--samples", 8, "--seed", 0, "--out", out / "sampled.h5")])
    assert code == 0
    return out / "sampled.h5", hkl


SAMPLING_FIT = ["--shells", 1, "--model", "sampling", "--statistics", "classical", "--scale", "fixed",
                "--background", "none", "--samples", 8]


def spy_on_tds_fit(monkeypatch) -> dict:
    """What `plot_tds_fit` is given (q_norm, observed, model, sigma), for every call."""
    calls = []
    draw = tds_plot.plot_tds_fit

    def spy(q_norm, observed, model, sigma, path, **kwargs):
        calls.append({"q_norm": q_norm, "observed": observed, "model": model, "sigma": sigma})
        draw(q_norm, observed, model, sigma, path, **kwargs)

    monkeypatch.setattr(tds_plot, "plot_tds_fit", spy)
    return calls


def parameters(folder) -> np.ndarray:
    return np.array([p["value"] for p in json.loads((folder / "fit.json").read_text())["parameters"]])


@pytest.fixture(scope="module")
def fitted(dataset, tmp_path_factory):
    """An `ase-tds fit` output folder, with the truth's phonopy file as --reference."""
    folder, structure, _ = dataset
    out = tmp_path_factory.mktemp("fit") / "out"
    result = ase_tds("fit", structure, folder / "data.h5", "--out", out, "--shells", 1, "--model", "one-phonon",
                     "--statistics", "classical", "--scale", "fixed", "--background", "none", "--start", "emt",
                     "--reference", folder / "truth" / "phonopy_params.yaml")
    assert result.returncode == 0, result.stderr
    return out


def test_help_lists_the_commands():
    result = ase_tds("--help")
    assert result.returncode == 0
    for command in ("demo", "fit", "simulate", "export", "plot"):
        assert command in result.stdout


@pytest.mark.parametrize("command, options", [
    ("demo", ["--out", "--points"]),
    ("fit", ["--reference", "--shells", "--start", "--compton", "--loss", "poisson", "--checkpoint", "sampling", "--optimizer",
             "--samples", "--supercell", "--seed"]),
    ("simulate", ["--fc", "--hkl", "--temperature", "--model", "--statistics", "--counts", "--out", "sampling",
                  "--samples", "--supercell", "--seed"]),
    ("export", ["--supercell", "--temperature", "--samples", "--out", "--statistics", "--seed", "--energy-key",
                "--forces-key"]),
    ("plot", ["SOURCE", "--label", "--out"]),
])
def test_each_command_has_help(capsys, command, options):
    try:
        main([command, "--help"])
    except SystemExit as stop:
        assert stop.code == 0
    text = capsys.readouterr().out
    for option in options + ["--device"]:
        assert option in text


def test_fit_writes_every_output_and_recovers(dataset, fitted):
    folder, structure, truth = dataset
    out = fitted
    assert {p.name for p in out.iterdir()} == {"phonopy_params.yaml", "FORCE_CONSTANTS", "force_constants.hdf5",
                                              "fit.json", "data.h5", "dispersion.png", "tds_fit.png",
                                              "identifiability.png"}
    fitted = {p["label"]: p["value"] for p in json.loads((out / "fit.json").read_text())["parameters"]}
    assert fitted == pytest.approx(truth.parameter_dict(), abs=1e-4)
    ph = phonopy.load(out / "phonopy_params.yaml", produce_fc=False, log_level=0)
    q = truth.q_from_hkl([[1, 0, 0]])
    ph.run_qpoints([[0, 0.5, 0.5]])  # X in the fcc primitive reciprocal basis
    np.testing.assert_allclose(ph.qpoints.frequencies[0], truth.frequencies(q)[0], atol=1e-3)


def test_fit_compton_recovers_the_amplitude_and_draws_it(dataset, tmp_path, capsys, monkeypatch):
    """Hubbell's incoherent scattering × 0.8 added to exact one-phonon data: --compton finds 0.8 and the truth,
    and tds_fit.png draws the whole fitted model (s·I + b + A·c), which here is the data; `plot` redraws it."""
    folder, structure, truth = dataset
    data = TDSData.read(folder / "data.h5", structure=read(structure))
    incoherent = 0.8 * ComptonShape(["Ni"])(data.q_norm)
    assert np.median(incoherent / data.intensity) > 0.05  # a term the drawing cannot leave out unseen
    dataclasses.replace(data, intensity=data.intensity + incoherent).write(tmp_path / "compton.h5")
    drawn = spy_on_tds_fit(monkeypatch)
    out = tmp_path / "out"
    code, err = in_process(capsys, "fit", structure, tmp_path / "compton.h5", "--out", out, "--shells", 1,
                           "--model", "one-phonon", "--statistics", "classical", "--scale", "fixed",
                           "--background", "none", "--compton")
    assert code == 0, err
    saved = json.loads((out / "fit.json").read_text())
    assert saved["settings"]["compton"] is True and saved["compton"] == pytest.approx(0.8, rel=1e-6)
    np.testing.assert_allclose(parameters(out), truth.theta.detach().numpy(), atol=1e-5)
    (call,) = drawn
    np.testing.assert_allclose(call["model"], call["observed"], rtol=1e-6)
    # the drawn curve is FitResult.calculated of the fitted model's I(Q), Compton term included
    result = FitResult.from_dict(saved, symbols=["Ni"])
    model = ForceConstantModel(read(structure), shells=1).set_parameters(result.theta)
    intensity = tds_model(model, 300.0, method="one-phonon", statistics="classical").forward(
        model.q_from_hkl(TDSData.read(out / "data.h5").hkl)).detach().numpy()
    used = TDSData.read(out / "data.h5").mask
    np.testing.assert_allclose(call["model"], result.calculated(intensity[used], call["q_norm"]), rtol=1e-10)
    assert np.abs(call["model"] - (intensity[used] * result.scale + result.background)).min() > 0.01
    code, err = in_process(capsys, "plot", out, "--out", tmp_path)
    assert code == 0, err
    np.testing.assert_allclose(drawn[1]["model"], call["model"], rtol=1e-9)
    np.testing.assert_array_equal(matplotlib.image.imread(tmp_path / "tds_fit.png"),
                                  matplotlib.image.imread(out / "tds_fit.png"))


def test_fit_poisson_loss_is_the_api_fit(dataset, tmp_path, capsys):
    """--loss poisson on counting data (σ = √n/t): the θ, scale and deviance of fit(..., loss="poisson")."""
    folder, structure, truth = dataset
    atoms = read(structure)
    hkl = np.random.default_rng(4).uniform(-3, 3, size=(200, 3))
    simulate(truth, hkl, 300.0, method="one-phonon", statistics="classical", counts=1e4,
             rng=4).write(tmp_path / "counts.h5")
    out = tmp_path / "out"
    code, err = in_process(capsys, "fit", structure, tmp_path / "counts.h5", "--out", out, "--shells", 1,
                           "--model", "one-phonon", "--statistics", "classical", "--background", "none",
                           "--loss", "poisson", "--start", folder / "truth" / "phonopy_params.yaml")
    assert code == 0, err
    saved = json.loads((out / "fit.json").read_text())
    model = ForceConstantModel(atoms, shells=1).set_from_phonopy(folder / "truth" / "phonopy_params.yaml")
    data = TDSData.read(tmp_path / "counts.h5", structure=atoms).mask_bragg(0.1, model.primitive.cell[:])
    expected = fit(model, data, method="one-phonon", statistics="classical", background="none", loss="poisson",
                   progress=False)
    assert saved["settings"]["loss"] == "poisson" and saved["deviance"] == pytest.approx(expected.deviance, rel=1e-9)
    np.testing.assert_allclose(parameters(out), expected.theta, rtol=1e-9)
    assert saved["scale"] == pytest.approx(expected.scale, rel=1e-9)
    assert np.all(np.abs(expected.theta - truth.theta.detach().numpy()) < 4 * expected.sigma)


def test_simulate_sampling_writes_the_monte_carlo_error(dataset, sampled):
    """The sampling model's mean and standard error (3×3×3 supercell: the least holding the 1/3 grid) as I and σ."""
    _, structure, truth = dataset
    path, hkl = sampled
    data = TDSData.read(path, structure=read(structure))
    sampler = QSpaceSampler(truth, (3, 3, 3), 300.0, "classical", n_samples=8, seed=0, progress=False)
    tds = tds_model(truth, 300.0, method="sampling", statistics="classical", sampler=sampler)
    mean, stderr = (x.detach().numpy() for x in tds.intensity(truth.q_from_hkl(hkl)))
    np.testing.assert_allclose(data.intensity, mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(data.sigma, stderr, rtol=1e-8)
    assert data.absolute and 0.1 < np.median(data.sigma / data.intensity) < 1  # 8 samples: ≈ 1/√8


def test_sampling_fit_resumes_from_a_checkpoint_and_draws_its_own_sampler(dataset, sampled, tmp_path, capsys,
                                                                           monkeypatch):
    """Adam with the default seed (that of the data): at most 40 iterations recover the truth; 10 with --checkpoint,
    then resumed to 40, give the same θ to the last bit; the drawing uses the fit's sampler (drawn = data, not
    another draw of the Monte-Carlo noise, ≈ 35 % off). A checkpoint of other settings is refused."""
    _, structure, truth = dataset
    path, _ = sampled
    drawn = spy_on_tds_fit(monkeypatch)
    run = lambda out, *extra: in_process(capsys, "fit", structure, path, "--out", tmp_path / out,
                                         *SAMPLING_FIT, *extra)
    code, err = run("whole", "--max-iter", 40)
    assert code == 0, err
    whole = parameters(tmp_path / "whole")
    true = truth.theta.detach().numpy()
    assert np.abs(whole - true).max() < 1e-3 * np.abs(true).max()
    settings = json.loads((tmp_path / "whole" / "fit.json").read_text())["settings"]
    assert settings["sampler"] == {"kind": "QSpaceSampler", "supercell": [3, 3, 3], "n_samples": 8, "seed": 0}
    np.testing.assert_allclose(drawn[0]["model"], drawn[0]["observed"], rtol=1e-2)

    checkpoint = tmp_path / "fit.ckpt"
    code, err = run("part", "--max-iter", 10, "--checkpoint", checkpoint)
    assert code == 3 and checkpoint.is_file(), err  # stopped at the iteration limit: not converged, exit 3
    assert "did not converge (iteration limit (10)" in err
    assert json.loads((tmp_path / "part" / "fit.json").read_text())["status"]["converged"] is False
    assert json.loads(checkpoint.read_text())["iterations"] == 10
    code, err = run("resumed", "--max-iter", 40, "--checkpoint", checkpoint)
    assert code == 0, err
    np.testing.assert_allclose(parameters(tmp_path / "resumed"), whole, rtol=0, atol=1e-12)
    iterations = [json.loads((tmp_path / out / "fit.json").read_text())["iterations"] for out in ("whole", "resumed")]
    assert iterations[0] == iterations[1] > 10

    code, err = run("other", "--max-iter", 30, "--checkpoint", checkpoint, "--seed", 1)
    last = err.strip().splitlines()[-1]  # after the progress bar of the EMT start
    assert code == 2 and "Traceback" not in err and last.startswith("ase-tds: error:")
    assert "other settings" in last and "'seed': 1" in last and not (tmp_path / "other").exists()


@pytest.mark.parametrize("args, message", [
    (["fit", "missing.cif", "missing.h5", "--out", "x"], "missing.cif"),
    (["fit", "{structure}", "missing.h5", "--out", "x"], "missing.h5"),
    (["fit", "{structure}", "{data}", "--out", "x", "--cutoff", "2.489016"], "lies on the neighbour shell"),
    (["fit", "{structure}", "{data}", "--out", "x", "--start", "zero", "--model", "one-phonon"], "unstable"),
    (["fit", "{structure}", "{data}", "--out", "x", "--start", "calculator:no_such_module.Calc"], "cannot import"),
    (["fit", "{structure}", "{data}", "--out", "x", "--start", "calculator:EMT"], "calculator:module.Class"),
])
def test_user_errors_are_one_line(dataset, tmp_path, args, message):
    folder, structure, _ = dataset
    args = [a.format(structure=structure, data=folder / "data.h5") for a in args]
    result = ase_tds(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_fit_draws_the_reference_and_plot_redraws_the_folder(fitted, tmp_path):
    # dispersion.png of fit: fitted (C0), start (C1) and the --reference (C2)
    assert colour_pixels(fitted / "dispersion.png", "C2") > 100
    result = ase_tds("plot", fitted, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"dispersion.png", "tds_fit.png", "identifiability.png"}
    redrawn = tmp_path / "dispersion.png"  # the fit folder's force constants alone: one curve, no reference
    assert colour_pixels(redrawn, "C0") > 1000 and colour_pixels(redrawn, "C2") == 0
    # tds_fit.png from data.h5, fit.json and the written force constants: the picture the fit drew
    np.testing.assert_array_equal(matplotlib.image.imread(tmp_path / "tds_fit.png"),
                                  matplotlib.image.imread(fitted / "tds_fit.png"))


def test_plot_compares_force_constant_files(dataset, fitted, tmp_path, capsys, monkeypatch):
    folder, _, _ = dataset
    figures = drawn_figures(monkeypatch)
    for labels in (["--label", "truth", "fitted"], ["--label", "truth", "--label", "fitted"]):
        code, err = in_process(capsys, "plot", folder / "truth" / "phonopy_params.yaml", fitted, *labels,
                               "--out", tmp_path)
        assert code == 0, err
        assert [p.name for p in tmp_path.iterdir()] == ["dispersion.png"]  # the first SOURCE is no fit folder
        assert colour_pixels(tmp_path / "dispersion.png", "C1") > 100
        assert [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()] == ["truth", "fitted"]


def test_simulate_uses_the_phonopy_file_as_it_is(dataset, tmp_path, capsys):
    folder, structure, truth = dataset
    hkl = np.random.default_rng(8).uniform(-3, 3, size=(30, 3))
    np.savetxt(tmp_path / "hkl.txt", hkl)
    expected = simulate(truth, hkl, 250.0, method="one-phonon", statistics="classical").intensity
    result = ase_tds("simulate", structure, "--fc", folder / "truth", "--hkl", tmp_path / "hkl.txt",
                     "--temperature", 250, "--model", "one-phonon", "--statistics", "classical",
                     "--out", tmp_path / "sim.h5")
    assert result.returncode == 0, result.stderr
    data = TDSData.read(tmp_path / "sim.h5", structure=read(structure))
    np.testing.assert_allclose(data.hkl, hkl, rtol=0, atol=1e-15)
    np.testing.assert_allclose(data.intensity, expected, rtol=1e-9)
    assert data.temperature == 250.0 and data.absolute and data.sigma is None

    np.save(tmp_path / "hkl.npy", hkl)  # the hkl of a .npy, and of an HDF5 point list, with noise
    for source, extra in ((tmp_path / "hkl.npy", []), (tmp_path / "sim.h5", ["--counts", 1e4, "--seed", 1])):
        code, err = in_process(capsys, "simulate", structure, "--fc", folder / "truth" / "phonopy_params.yaml",
                               "--hkl", source, "--temperature", 250, "--model", "one-phonon", "--statistics",
                               "classical", "--out", tmp_path / "again.h5", "--overwrite", *extra)
        assert code == 0, err
        again = TDSData.read(tmp_path / "again.h5", structure=read(structure))
        np.testing.assert_allclose(again.hkl, hkl, rtol=0, atol=1e-15)
        rtol = 1e-9 if not extra else 5 / np.sqrt(1e4) * again.intensity.mean() / again.intensity.min()
        np.testing.assert_allclose(again.intensity, expected, rtol=rtol)
        assert (again.sigma is not None) == bool(extra)


def test_export_writes_training_data(fitted, tmp_path):
    out = tmp_path / "train.extxyz"
    result = ase_tds("export", fitted, "--supercell", 2, 2, 2, "--temperature", 300, "--samples", 4, "--out", out,
                     "--seed", 2, "--energy-key", "E_ref", "--forces-key", "F_ref")
    assert result.returncode == 0, result.stderr
    frames = read(out, ":")
    assert len(frames) == 4 and len(frames[0]) == 32
    for frame in frames:
        assert frame.info["E_ref"] == frame.get_potential_energy() > 0
        np.testing.assert_array_equal(frame.arrays["F_ref"], frame.get_forces())
        assert frame.info["source"] == str(fitted.resolve()) and frame.info["temperature"] == 300.0


@pytest.mark.parametrize("args, message", [
    (["simulate", "{structure}", "--fc", "{truth}", "--hkl", "{bad_hkl}", "--temperature", 300, "--out", "x.h5"],
     "give N ≥ 1 rows of three"),
    (["simulate", "{structure}", "--fc", "{truth}", "--hkl", "missing.txt", "--temperature", 300, "--out", "x.h5"],
     "missing.txt: no such hkl file"),
    (["simulate", "{structure}", "--fc", "missing", "--hkl", "{hkl}", "--temperature", 300, "--out", "x.h5"],
     "no phonopy file at missing"),
    (["simulate", "{other}", "--fc", "{truth}", "--hkl", "{hkl}", "--temperature", 300, "--out", "x.h5"],
     "not a lattice of the force constants' crystal"),
    (["simulate", "{structure}", "--fc", "{truth}", "--hkl", "{hkl}", "--temperature", -3, "--out", "x.h5"],
     "temperature must be > 0"),
    (["simulate", "{structure}", "--fc", "{truth}", "--hkl", "{hkl}", "--temperature", 300, "--out", "no/x.h5"],
     "no such folder"),
    (["export", "{truth}", "--supercell", 2, 2, 2, "--temperature", 0, "--samples", 2, "--out", "x.extxyz",
      "--statistics", "classical"], "temperature must be > 0"),  # quantum (the default) allows 0 K: zero-point motion
    (["export", "{truth}", "--supercell", 2, 2, 2, "--temperature", 300, "--samples", 0, "--out", "x.extxyz"],
     "n_samples must be a positive integer"),
    (["export", "{truth}", "--supercell", 2, 2, 2, "--temperature", 300, "--samples", 2, "--out", "."],
     "is a folder"),
    (["export", "{truth}", "--supercell", 2, 2, 2, "--temperature", 300, "--samples", 2, "--out", "x.extxyz",
      "--energy-key", "a=b"], "energy_key must be a name"),
    (["plot", "missing.yaml"], "no phonopy file at missing.yaml"),
    (["plot", "{truth}", "--label", "a", "--label", "b"], "2 --label for 1 SOURCE"),
    (["plot", "{truth}", "{truth}", "--label", "a"], "1 --label for 2 SOURCE; give one per SOURCE"),
    (["fit", "{structure}", "{data}", "--out", "x", "--shells", 0],
     "--shells 0: give a positive number of neighbour shells"),
    (["fit", "{structure}", "{data}", "--out", "x", "--cutoff", 0],
     "--cutoff 0: give a positive force-constant cutoff"),
    (["fit", "{structure}", "{data}", "--out", "x", "--cutoff", -2.5], "--cutoff -2.5: give a positive"),
    (["fit", "{empty}", "{data}", "--out", "x"], "empty.cif: the structure file is empty"),
    (["fit", "{garbage}", "{data}", "--out", "x"], "garbage.cif: ASE could not read a structure from it"),
    (["fit", "{molecule}", "{data}", "--out", "x"], "water.xyz: holds no periodic 3D unit cell"),
    (["simulate", "{molecule}", "--fc", "{truth}", "--hkl", "{hkl}", "--temperature", 300, "--out", "x.h5"],
     "water.xyz: holds no periodic 3D unit cell"),
    (["simulate", "{structure}", "--fc", "{unstable}", "--hkl", "{hkl}", "--temperature", 300, "--out", "x.h5",
      "--model", "one-phonon"], "--fc {unstable}: the force constants are dynamically unstable"),
    (["simulate", "{structure}", "--fc", "{unstable}", "--hkl", "{hkl}", "--temperature", 300, "--out", "x.h5"],
     "--fc {unstable}: the force constants are dynamically unstable"),
    (["plot", "{truth}", "{truth}"], "repeat; give each SOURCE its own --label"),
    (["fit", "{structure}", "{data}", "--out", "x", "--model", "sampling", "--samples", 0],
     "--samples 0: the sampling model needs N ≥ 2"),
    (["fit", "{structure}", "{data}", "--out", "x", "--model", "sampling", "--supercell", 3, 0, 3],
     "--supercell 3 0 3: give three positive repetitions"),
    (["fit", "{structure}", "{data}", "--out", "x", "--samples", 8, "--seed", 1],
     "--samples and --seed set the sampling model; add --model sampling"),
    (["fit", "{structure}", "{data}", "--out", "x", "--model", "sampling", "--shells", 1],
     "are not multiples of 1/L for any L ≤ 48"),
    (["fit", "{structure}", "{data}", "--out", "x", "--model", "sampling", "--shells", 1, "--supercell", 2, 2, 2],
     "is not on the reciprocal lattice of the 2×2×2 supercell"),
    (["fit", "{structure}", "{data}", "--out", "x", "--loss", "poisson"], "--loss poisson needs the counts"),
    (["fit", "{structure}", "{negative}", "--out", "x", "--loss", "poisson", "--shells", 1, "--model", "one-phonon"],
     "--loss poisson needs intensities ≥ 0 (counts/exposure): 1 used points"),
    (["fit", "{structure}", "{data}", "--out", "x", "--checkpoint", "."], "--checkpoint . is a folder"),
    (["fit", "{structure}", "{data}", "--out", "x", "--checkpoint", "no/fit.ckpt"], "no such folder no"),
    (["simulate", "{structure}", "--fc", "{truth}", "--hkl", "{hkl}", "--temperature", 300, "--out", "x.h5",
      "--model", "sampling", "--samples", 1], "--samples 1: the sampling model needs N ≥ 2"),
    (["simulate", "{structure}", "--fc", "{truth}", "--hkl", "{hkl}", "--temperature", 300, "--out", "x.h5",
      "--model", "sampling", "--supercell", -1, 2, 2], "--supercell -1 2 2: give three positive repetitions"),
    (["simulate", "{structure}", "--fc", "{truth}", "--hkl", "{off_grid}", "--temperature", 300, "--out", "x.h5",
      "--model", "sampling"], "the points' h (r.l.u. of the unit cell) are not multiples of 1/L"),
    (["simulate", "{structure}", "--fc", "{truth}", "--hkl", "{hkl}", "--temperature", 300, "--out", "x.h5",
      "--supercell", 2, 2, 2], "--supercell sets the sampling model; add --model sampling"),
])
def test_new_commands_refuse_bad_input_in_one_line(dataset, unstable, tmp_path, capsys, monkeypatch, args,
                                                    message):
    folder, structure, truth = dataset
    (tmp_path / "empty.cif").touch()
    (tmp_path / "garbage.cif").write_text("not a structure\n")
    write(tmp_path / "water.xyz", molecule("H2O"))
    np.savetxt(tmp_path / "bad_hkl.txt", np.ones((4, 2)))
    np.savetxt(tmp_path / "hkl.txt", np.ones((4, 3)))
    np.savetxt(tmp_path / "off_grid.txt", np.full((4, 3), 0.37))
    other = tmp_path / "other.cif"
    write(other, _strained_ni())
    data = TDSData.read(folder / "data.h5", structure=read(structure))
    negative = data.intensity * np.where(np.arange(len(data)) == 7, -1, 1)  # one point below zero, σ given
    dataclasses.replace(data, intensity=negative, sigma=0.01 * np.abs(negative)).write(tmp_path / "negative.h5")
    names = dict(structure=structure, truth=folder / "truth", hkl=tmp_path / "hkl.txt",
                 bad_hkl=tmp_path / "bad_hkl.txt", other=other, data=folder / "data.h5",
                 negative=tmp_path / "negative.h5", off_grid=tmp_path / "off_grid.txt", unstable=unstable,
                 empty=tmp_path / "empty.cif", garbage=tmp_path / "garbage.cif", molecule=tmp_path / "water.xyz")
    args = [a.format(**{k: str(v) for k, v in names.items()}) if isinstance(a, str) else a for a in args]
    message = message.format(unstable=unstable)
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    code, err = in_process(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ase-tds: error:") and message in lines[0]
    assert set(tmp_path.iterdir()) == before  # nothing written


def test_a_bad_export_exits_2_without_traceback(dataset, tmp_path):
    folder, _, _ = dataset
    result = ase_tds("export", folder / "truth", "--supercell", 1, 1, 1, "--temperature", -3, "--samples", 2,
                     "--out", tmp_path / "x.extxyz")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "temperature" in result.stderr and not any(tmp_path.iterdir())


def _strained_ni():
    atoms = ni_conventional()
    atoms.set_cell(atoms.cell[:] * [1.0, 1.0, 1.1], scale_atoms=True)
    return atoms


def refuse_work(monkeypatch):
    """Make the first piece of work of every command fail the test: reading a structure or force constants,
    building a model, writing training data."""
    def work(*args, **kwargs):
        pytest.fail("the command worked before checking --out")

    for target in ("ase.io.read", "ase_tds.phonopy_source.PhonopyForceConstants", "ase_tds.export.write_training_data",
                   "ase_tds.model.ForceConstantModel.__init__"):
        monkeypatch.setattr(target, work)


@pytest.mark.parametrize("args, message", [
    (["demo", "--out", "notes.txt"], "--out notes.txt: notes.txt is a file, not a folder"),
    (["fit", "{structure}", "{data}", "--out", "notes.txt"], "--out notes.txt: notes.txt is a file, not a folder"),
    (["fit", "{structure}", "{data}", "--out", "notes.txt/fit"],
     "--out notes.txt/fit: notes.txt is a file, not a folder"),
    (["plot", "{truth}", "--out", "notes.txt"], "--out notes.txt: notes.txt is a file, not a folder"),
    (["simulate", "{structure}", "--fc", "{truth}", "--hkl", "{data}", "--temperature", 300, "--out", "no/x.h5"],
     "--out no/x.h5: no such folder no"),
    (["export", "{truth}", "--supercell", 2, 2, 2, "--temperature", 300, "--samples", 2, "--out", "no/x.extxyz"],
     "--out no/x.extxyz: no such folder no"),
])
def test_out_is_checked_before_any_work(dataset, tmp_path, capsys, monkeypatch, args, message):
    folder, structure, _ = dataset
    (tmp_path / "notes.txt").write_text("not a folder")
    args = [a.format(structure=structure, data=folder / "data.h5", truth=folder / "truth") if isinstance(a, str) else a
            for a in args]
    monkeypatch.chdir(tmp_path)
    refuse_work(monkeypatch)
    code, err = in_process(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"ase-tds: error: {message}")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_plot_makes_its_out_folder_as_fit_does(dataset, tmp_path, capsys):
    folder, _, _ = dataset
    code, err = in_process(capsys, "plot", folder / "truth", "--out", tmp_path / "new" / "plots")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "new" / "plots").iterdir()] == ["dispersion.png"]


def test_ctrl_c_during_a_fit_says_where_the_checkpoint_is_and_resumes(dataset, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the third iteration's checkpoint: exit 130, one line naming the checkpoint; the same command
    then resumes from it and finishes."""
    folder, structure, _ = dataset
    checkpoint = tmp_path / "fit.ckpt"
    command = ["fit", structure, folder / "data.h5", "--out", tmp_path / "out", "--shells", 1, "--model", "one-phonon",
               "--statistics", "classical", "--scale", "fixed", "--background", "none", "--checkpoint", checkpoint]
    write, calls = Checkpoint.write, []

    def interrupted(self, *args, **kwargs):
        write(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "write", interrupted)
    code, err = in_process(capsys, *command)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"ase-tds: interrupted; the fit so far is saved in {checkpoint}: run the "
                                            "same command again to resume from it")
    assert json.loads(checkpoint.read_text())["iterations"] == 3 and not (tmp_path / "out").exists()
    code, err = in_process(capsys, *command)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "fit.json").read_text())["iterations"] > 3


@pytest.mark.parametrize("command, work, hint", [
    (["fit", "{structure}", "{data}", "--out", "out", "--shells", 1], ("ase_tds.fitting", "fit"),
     " (give --checkpoint FILE to be able to resume a fit)"),
    (["demo", "--out", "out", "--points", 50], ("ase_tds.forward", "simulate"), ""),
])
def test_ctrl_c_without_a_checkpoint_says_nothing_was_written(dataset, tmp_path, capsys, monkeypatch, command, work,
                                                              hint):
    folder, structure, _ = dataset
    command = [a.format(structure=structure, data=folder / "data.h5") if isinstance(a, str) else a for a in command]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module, name = work
    monkeypatch.setattr(importlib.import_module(module), name, interrupted)
    monkeypatch.chdir(tmp_path)
    code, err = in_process(capsys, *command)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"ase-tds: interrupted; nothing was written{hint}"
    assert not any(tmp_path.iterdir())


def test_plot_draws_imaginary_branches_below_zero_and_warns(unstable, tmp_path, capsys, monkeypatch):
    """Force constants with every mode imaginary: the branches are drawn (below zero, as phonopy draws them),
    not cut off by the axis, with a one-line warning naming the source."""
    figures = drawn_figures(monkeypatch)
    code, err = in_process(capsys, "plot", unstable, "--out", tmp_path)
    assert code == 0, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"ase-tds: warning: {unstable}: imaginary modes down to -10.")
    assert line.endswith("(dynamically unstable), drawn below zero")
    assert figures[0].axes[0].get_ylim()[0] < -10
    assert colour_pixels(tmp_path / "dispersion.png", "C0") > 1000


def test_dispersion_labels_path_breaks_and_draws_later_curves_on_top(dataset, tmp_path, monkeypatch):
    """The fcc path's break K|U is one tick labelled "K|U", as phonopy labels it, and no line joins K to U;
    a second curve (e.g. the reference) is drawn thin and dashed over the first's thick line, not under it."""
    _, _, truth = dataset
    _, x, ticks, labels = tds_plot.dispersion_path(truth)
    assert labels == [r"$\Gamma$", "X", "W", "K", r"$\Gamma$", "L", "U", "W", "L", "K|U", "X"]
    assert np.all(np.diff(ticks) > 0)
    figures = drawn_figures(monkeypatch)
    tds_plot.plot_dispersion({"fitted": truth, "reference": truth}, tmp_path / "dispersion.png")
    lines = figures[0].axes[0].get_lines()
    first, reference = ([line for line in lines if line.get_color() == colour] for colour in ("C0", "C1"))
    assert len(first) == len(reference) == 2 * 3  # two segments (before and after the break) of three branches
    assert min(line.get_zorder() for line in reference) > max(line.get_zorder() for line in first)
    assert all(line.get_linestyle() == "--" and line.get_linewidth() < first[0].get_linewidth() for line in reference)
    assert min(colour_pixels(tmp_path / "dispersion.png", colour) for colour in ("C0", "C1")) > 1000


def test_tds_fit_shows_the_data_where_the_model_agrees(tmp_path, monkeypatch):
    """Data markers stay visible on top of a model that agrees with them: as many data-coloured pixels as when
    the model lies far away."""
    rng = np.random.default_rng(0)
    q_norm = rng.uniform(1, 8, 300)
    observed = np.exp(-q_norm) * rng.uniform(0.5, 2, 300)
    figures = drawn_figures(monkeypatch)
    tds_plot.plot_tds_fit(q_norm, observed, observed, 0.01 * observed, tmp_path / "agree.png")
    tds_plot.plot_tds_fit(q_norm, observed, 1e3 * observed, 0.01 * observed, tmp_path / "apart.png")
    (data,) = [line for line in figures[0].axes[0].get_lines() if line.get_label() == "data"]
    agree, apart = (colour_pixels(tmp_path / name, data.get_color()) for name in ("agree.png", "apart.png"))
    assert agree > 0.8 * apart > 500


def test_start_from_any_importable_calculator_equals_its_own_start():
    """--start calculator:ase.calculators.emt.EMT: the same force constants as --start emt (finite displacements
    with the calculator built by name)."""
    from ase_tds.fitting import set_start

    fresh = lambda: ForceConstantModel(ni_conventional(), shells=2)  # noqa: E731
    by_name = set_start(fresh(), "calculator:ase.calculators.emt.EMT")
    np.testing.assert_allclose(by_name.theta.detach().numpy(),
                               set_start(fresh(), "emt").theta.detach().numpy(), atol=1e-12)
    assert abs(by_name.parameter_dict()["1XX"]) > 0.5


def test_fit_from_springs_needs_no_calculator(dataset, tmp_path, capsys):
    """--start springs (any crystal, no EMT): the one-phonon fit of the shell-1 truth reaches it."""
    folder, structure, truth = dataset
    code, err = in_process(capsys, "fit", structure, folder / "data.h5", "--out", tmp_path / "springs", "--shells", 1,
                           "--model", "one-phonon", "--statistics", "classical", "--start", "springs")
    assert code == 0, err
    fitted = parameters(tmp_path / "springs")
    np.testing.assert_allclose(fitted, truth.theta.detach().numpy(), rtol=1e-3)


def test_tds_fit_of_a_whole_volume_draws_an_even_subset(fitted, tmp_path, monkeypatch):
    """Above DRAWN_POINTS used points, tds_fit.png draws an evenly spaced subset of them (the same points with the
    same model values as the full drawing), and its title says how many of how many."""
    import ase_tds.report as report

    calls, draw = [], tds_plot.plot_tds_fit

    def spy(q_norm, observed, model, sigma, path, title="TDS fit"):
        calls.append({"q_norm": q_norm, "observed": observed, "model": model, "sigma": sigma, "title": title})
        draw(q_norm, observed, model, sigma, path, title=title)

    monkeypatch.setattr(tds_plot, "plot_tds_fit", spy)
    assert main(["plot", str(fitted), "--out", str(tmp_path / "all")]) == 0
    monkeypatch.setattr(report, "DRAWN_POINTS", 50)
    assert main(["plot", str(fitted), "--out", str(tmp_path / "some")]) == 0
    full, some = calls
    n_used = len(full["q_norm"])
    assert full["title"] == "TDS fit" and some["title"] == f"TDS fit (50 of {n_used} points drawn)"
    pick = np.linspace(0, n_used - 1, 50).astype(int)
    for key in ("q_norm", "observed", "model", "sigma"):
        np.testing.assert_allclose(some[key], np.asarray(full[key])[pick], rtol=1e-12)
