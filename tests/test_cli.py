"""The `ase-tds` command driven as a user would: a subprocess, real files, bad input."""

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
from ase.io import read, write

from ase_tds import ForceConstantModel, TDSData, simulate
from ase_tds.cli import main
from ase_tds.io.phonopy import write_phonopy_files

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
    ("fit", ["--reference", "--shells", "--start"]),
    ("simulate", ["--fc", "--hkl", "--temperature", "--model", "--statistics", "--counts", "--out"]),
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
                                              "fit.json", "data.h5", "dispersion.png", "tds_fit.png"}
    fitted = {p["label"]: p["value"] for p in json.loads((out / "fit.json").read_text())["parameters"]}
    assert fitted == pytest.approx(truth.parameter_dict(), abs=1e-4)
    ph = phonopy.load(out / "phonopy_params.yaml", produce_fc=False, log_level=0)
    q = truth.q_from_hkl([[1, 0, 0]])
    ph.run_qpoints([[0, 0.5, 0.5]])  # X in the fcc primitive reciprocal basis
    np.testing.assert_allclose(ph.qpoints.frequencies[0], truth.frequencies(q)[0], atol=1e-3)


@pytest.mark.parametrize("args, message", [
    (["fit", "missing.cif", "missing.h5", "--out", "x"], "missing.cif"),
    (["fit", "{structure}", "missing.h5", "--out", "x"], "missing.h5"),
    (["fit", "{structure}", "{data}", "--out", "x", "--cutoff", "2.489016"], "lies on the neighbour shell"),
    (["fit", "{structure}", "{data}", "--out", "x", "--start", "zero", "--model", "one-phonon"], "unstable"),
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
    assert {p.name for p in tmp_path.iterdir()} == {"dispersion.png", "tds_fit.png"}
    redrawn = tmp_path / "dispersion.png"  # the fit folder's force constants alone: one curve, no reference
    assert colour_pixels(redrawn, "C0") > 1000 and colour_pixels(redrawn, "C2") == 0
    # tds_fit.png from data.h5, fit.json and the written force constants: the picture the fit drew
    np.testing.assert_array_equal(matplotlib.image.imread(tmp_path / "tds_fit.png"),
                                  matplotlib.image.imread(fitted / "tds_fit.png"))


def test_plot_compares_force_constant_files(dataset, fitted, tmp_path, capsys):
    folder, _, _ = dataset
    code, err = in_process(capsys, "plot", folder / "truth" / "phonopy_params.yaml", fitted, "--label", "truth",
                           "--out", tmp_path)
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["dispersion.png"]  # the first SOURCE is no fit folder
    assert colour_pixels(tmp_path / "dispersion.png", "C1") > 100


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
                               "classical", "--out", tmp_path / "again.h5", *extra)
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
    (["export", "{truth}", "--supercell", 1, 1, 1, "--temperature", 300, "--samples", 2, "--out", "x.extxyz"],
     "too small for the force constants' cutoff"),
    (["export", "{truth}", "--supercell", 2, 2, 2, "--temperature", 0, "--samples", 2, "--out", "x.extxyz"],
     "temperature must be > 0"),
    (["export", "{truth}", "--supercell", 2, 2, 2, "--temperature", 300, "--samples", 0, "--out", "x.extxyz"],
     "n_samples must be a positive integer"),
    (["export", "{truth}", "--supercell", 2, 2, 2, "--temperature", 300, "--samples", 2, "--out", "."],
     "is a folder"),
    (["export", "{truth}", "--supercell", 2, 2, 2, "--temperature", 300, "--samples", 2, "--out", "x.extxyz",
      "--energy-key", "a=b"], "energy_key must be a name"),
    (["plot", "missing.yaml"], "no phonopy file at missing.yaml"),
    (["plot", "{truth}", "--label", "a", "--label", "b"], "2 --label for 1 SOURCE"),
    (["plot", "{truth}", "{truth}"], "repeat; give each SOURCE its own --label"),
])
def test_new_commands_refuse_bad_input_in_one_line(dataset, tmp_path, capsys, monkeypatch, args, message):
    folder, structure, truth = dataset
    np.savetxt(tmp_path / "bad_hkl.txt", np.ones((4, 2)))
    np.savetxt(tmp_path / "hkl.txt", np.ones((4, 3)))
    other = tmp_path / "other.cif"
    write(other, _strained_ni())
    names = dict(structure=structure, truth=folder / "truth", hkl=tmp_path / "hkl.txt",
                 bad_hkl=tmp_path / "bad_hkl.txt", other=other)
    args = [a.format(**{k: str(v) for k, v in names.items()}) if isinstance(a, str) else a for a in args]
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    code, err = in_process(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ase-tds: error:") and message in lines[0]
    assert set(tmp_path.iterdir()) == before  # nothing written


def test_a_bad_export_exits_2_without_traceback(dataset, tmp_path):
    folder, _, _ = dataset
    result = ase_tds("export", folder / "truth", "--supercell", 1, 1, 1, "--temperature", 300, "--samples", 2,
                     "--out", tmp_path / "x.extxyz")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "too small for the force constants' cutoff" in result.stderr and not any(tmp_path.iterdir())


def _strained_ni():
    atoms = ni_conventional()
    atoms.set_cell(atoms.cell[:] * [1.0, 1.0, 1.1], scale_atoms=True)
    return atoms
