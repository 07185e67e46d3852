"""Scale: the loss and gradient accumulated over chunks equal one pass, and a fit sharded over two ranks by torchrun
(gloo, two processes) equals the one-process fit."""

import copy
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ase_tds import ForceConstantModel, simulate, tds_model
from ase_tds.data import add_poisson_noise

from conftest import ni_conventional

fit_module = importlib.import_module("ase_tds.fitting.objective")  # the loss of a fit (its CHUNK_POINTS)
TRUTH = {"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59, "2XX": -0.24, "2YY": 0.03}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    truth = ForceConstantModel(ni_conventional(), shells=2).set_from_bvk(TRUTH)
    rng = np.random.default_rng(0)
    hkl = rng.uniform(-3, 3, size=(400, 3))
    hkl = hkl[np.abs(hkl - np.round(hkl)).max(axis=1) > 0.15]
    data = add_poisson_noise(simulate(truth, hkl, 300.0, tds_options=dict(accuracy=1e-2)), 1e5, rng)
    ni_conventional().write(folder / "Ni.cif")
    data.write(folder / "data.h5")
    return folder, truth, data


@pytest.mark.parametrize("loss, compton", [("chi2", True), ("poisson", False)])
def test_chunks_give_the_loss_and_gradient_of_one_pass(dataset, monkeypatch, loss, compton):
    _, truth, data = dataset
    tds = tds_model(copy.deepcopy(truth), 300.0, grid=(5, 5, 5))
    theta = 0.9 * truth.theta.detach().numpy()
    whole = fit_module.Objective(tds, data, "free", "free", loss, compton=compton).evaluate(theta)
    monkeypatch.setattr(fit_module, "CHUNK_POINTS", 37)
    objective = fit_module.Objective(tds, data, "free", "free", loss, compton=compton)
    assert len(objective.chunks) == -(-len(objective.y) // 37)
    chunked = objective.evaluate(theta)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-10)  # sums in another order
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-9, atol=1e-12 * np.abs(whole[1]).max())
    np.testing.assert_allclose(chunked[2], whole[2], rtol=1e-9)


def _fit(folder, out, ranks, data="data.h5", options=("--shells", "2", "--accuracy", "1e-2", "--start", "emt")):
    command = ["-m", "ase_tds", "fit", str(folder / "Ni.cif"), str(folder / data), *options, "--out", str(out)]
    if ranks > 1:  # the recipe of the docs: `--` keeps torchrun from reading the fit's own options
        command = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", "29517",
                   *command[:2], "--", *command[2:]]
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "fit.json").read_text()), done


def test_two_ranks_reproduce_one_process(dataset, tmp_path):
    """With a first fit on a subset of 150 points (every rank draws the same), as a fit of 10⁶ points has."""
    folder, truth, _ = dataset
    options = ("--shells", "2", "--accuracy", "1e-2", "--start", "emt", "--first-fit-points", "150")
    one, _ = _fit(folder, tmp_path / "one", 1, options=options)
    two, done = _fit(folder, tmp_path / "two", 2, options=options)
    assert one["settings"]["first_fit"]["points"] == 150
    assert two["settings"]["first_fit"]["iterations"] == one["settings"]["first_fit"]["iterations"] > 0
    theta = [np.array([p["value"] for p in record["parameters"]]) for record in (one, two)]
    np.testing.assert_allclose(theta[1], theta[0], rtol=1e-10, atol=1e-12)
    assert two["iterations"] == one["iterations"] and two["chi2"] == pytest.approx(one["chi2"], rel=1e-10)
    assert two["model_error"]["max_relative"] == pytest.approx(one["model_error"]["max_relative"], rel=1e-10)
    np.testing.assert_allclose([p["sigma"] for p in two["parameters"]], [p["sigma"] for p in one["parameters"]],
                               rtol=1e-8)
    assert done.stdout.count("χ²_red") == 1  # rank 0 alone prints
    assert np.abs(theta[0] - truth.theta.detach().numpy()).max() < 0.02


def test_two_ranks_reproduce_one_process_with_the_sampling_model(dataset, tmp_path):
    """The sampling model under torchrun: every rank draws the same seeded displacements and estimates the
    intensity at its own points; the fit (L-BFGS on the seeded, deterministic loss) gives the θ, iterations and 1σ
    of one process."""
    folder, truth, _ = dataset
    rng = np.random.default_rng(1)
    hkl = rng.integers(-8, 9, size=(200, 3)) / 4  # on the reciprocal lattice of a 4×4×4 supercell
    hkl = hkl[np.abs(hkl - np.round(hkl)).max(axis=1) > 0]
    simulate(truth, hkl, 300.0, tds_options=dict(accuracy=1e-2)).write(folder / "quarter.h5")
    options = ("--shells", "2", "--start", "emt", "--model", "sampling", "--statistics", "classical",
               "--samples", "4", "--optimizer", "lbfgs")
    one, _ = _fit(folder, tmp_path / "one", 1, "quarter.h5", options)
    two, done = _fit(folder, tmp_path / "two", 2, "quarter.h5", options)
    theta = [np.array([p["value"] for p in record["parameters"]]) for record in (one, two)]
    np.testing.assert_allclose(theta[1], theta[0], rtol=1e-10, atol=1e-12)
    assert two["settings"]["sampler"] == one["settings"]["sampler"] and one["settings"]["sampler"]["seed"] is not None
    assert two["iterations"] == one["iterations"] and two["chi2"] == pytest.approx(one["chi2"], rel=1e-10)
    np.testing.assert_allclose([p["sigma"] for p in two["parameters"]], [p["sigma"] for p in one["parameters"]],
                               rtol=1e-8)
    assert two["warnings"] == one["warnings"]  # e.g. the points per distinct q, counted over all ranks
    assert done.stdout.count("χ²_red") == 1
