"""The forward-model protocol: every model in the table passes one conformance check, and a new model is one class
plus one table entry, usable from `simulate` and the command line at once."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase.io import read, write

from ase_tds import ForceConstantModel, TDSData, simulate
from ase_tds.cli import main
from ase_tds.forward import MODELS, ForwardModel, OnePhononModel, from_settings, tds_model
from ase_tds.io.phonopy import write_phonopy_files
from ase_tds.sampling import QSpaceSampler

from conftest import ni_conventional

T = 300.0
HKL = [[1.0, 0.5, 0.0], [2.0, 1.0, 1.5], [0.5, 0.5, 0.5], [3.0, 0.0, 0.5]]  # on the 2×2×2 supercell's lattice


@pytest.fixture(scope="module")
def nickel():
    return ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59})


def small(name, model):
    """Each model with a cheap discretisation."""
    options = {"one-phonon": dict(dw_mesh=3), "gaussian": dict(grid=(4, 4, 4)), "fft": dict(grid=(4, 4, 4)),
               "sampling": dict(sampler=QSpaceSampler(model, (2, 2, 2), T, "classical", n_samples=4, seed=1,
                                                      progress=False))}
    return tds_model(model, T, method=name, statistics="classical", **options.get(name, {}))


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_conforms(nickel, name):
    """Name and table agree; intensities are finite, positive and differentiable in θ; the standard error is there
    exactly for Monte-Carlo models and the model's own error only for models with a grid; settings rebuild the same
    model."""
    model = copy.deepcopy(nickel)
    tds = small(name, model)
    assert isinstance(tds, ForwardModel) and tds.name == name and type(tds) is MODELS[name]
    q = torch.as_tensor(model.q_from_hkl(HKL))
    value, stderr = tds.intensity(q)
    assert value.shape == (len(HKL),) and torch.all(torch.isfinite(value)) and torch.all(value.detach() > 0)
    assert (stderr is not None) == tds.monte_carlo
    value.sum().backward()
    assert model.theta.grad is not None and torch.all(torch.isfinite(model.theta.grad))
    assert model.theta.grad.abs().max() > 0
    error = tds.discretisation_error(q)
    assert error.shape == (len(HKL),) and (bool(error.abs().max() > 0) == tds.has_grid)
    settings = tds.settings()
    assert settings["method"] == name and settings["temperature"] == T and settings["statistics"] == "classical"
    with torch.no_grad():
        again = from_settings(model, settings)(q)
        np.testing.assert_allclose(again.numpy(), value.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(tds.rebuilt()(q).numpy(), value.detach().numpy(), rtol=1e-12)


def test_unknown_names_and_options_are_refused(nickel):
    with pytest.raises(ValueError, match="method must be one of .*one-phonon.*gaussian.*sampling"):
        tds_model(nickel, T, method="two-phonon")
    with pytest.raises(ValueError, match="no forward model takes gird"):
        tds_model(nickel, T, method="gaussian", gird=(4, 4, 4))


class DoubledModel(OnePhononModel):
    """A toy forward model: twice the one-phonon intensity."""

    name = "doubled"

    def forward(self, q, levels=None):
        return 2 * super().forward(q)


def test_a_new_model_is_one_class_and_one_entry(nickel, tmp_path, monkeypatch, capsys):
    """Registered in the table, the toy model serves `simulate`, `ase-tds simulate --model` and fit.json's record."""
    monkeypatch.setitem(MODELS, "doubled", DoubledModel)
    hkl = np.array(HKL)
    doubled = simulate(nickel, hkl, T, method="doubled", statistics="classical", tds_options=dict(dw_mesh=3))
    single = simulate(nickel, hkl, T, method="one-phonon", statistics="classical", tds_options=dict(dw_mesh=3))
    np.testing.assert_allclose(doubled.intensity, 2 * single.intensity, rtol=1e-12)
    assert doubled.provenance["model"]["method"] == "doubled"

    structure = tmp_path / "Ni.cif"
    write(structure, ni_conventional())
    write_phonopy_files(nickel, tmp_path / "truth")
    np.savetxt(tmp_path / "hkl.txt", hkl)
    code = main(["simulate", str(structure), "--fc", str(tmp_path / "truth"), "--hkl", str(tmp_path / "hkl.txt"),
                 "--temperature", "300", "--model", "doubled", "--statistics", "classical", "--out",
                 str(tmp_path / "sim.h5")])
    assert code == 0, capsys.readouterr().err
    data = TDSData.read(tmp_path / "sim.h5", structure=read(structure))
    expected = simulate(nickel, hkl, T, method="doubled", statistics="classical").intensity
    np.testing.assert_allclose(data.intensity, expected, rtol=1e-9)
