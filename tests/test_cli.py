"""The `ase-tds` command driven as a user would: a subprocess, real files, bad input."""

import json
import subprocess
import sys

import numpy as np
import phonopy
import pytest
from ase.io import write

from ase_tds import ForceConstantModel, simulate

from conftest import ni_conventional


def ase_tds(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ase_tds.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    structure = folder / "Ni.cif"
    write(structure, ni_conventional())
    truth = ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59})
    hkl = np.random.default_rng(3).uniform(-3, 3, size=(200, 3))
    data = simulate(truth, hkl, 300.0, method="one-phonon", statistics="classical")
    data.write(folder / "data.h5")
    return folder, structure, truth


def test_help_lists_the_commands():
    result = ase_tds("--help")
    assert result.returncode == 0
    for command in ("demo", "fit"):
        assert command in result.stdout


def test_fit_writes_every_output_and_recovers(dataset, tmp_path):
    folder, structure, truth = dataset
    out = tmp_path / "out"
    result = ase_tds("fit", structure, folder / "data.h5", "--out", out, "--shells", 1, "--model", "one-phonon",
                     "--statistics", "classical", "--scale", "fixed", "--background", "none", "--start", "emt")
    assert result.returncode == 0, result.stderr
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
