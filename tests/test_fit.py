"""The inversion recovers known force constants from synthetic data (independent: the truth that made them)."""

import json
import warnings

import numpy as np
import pytest

from ase_tds import ForceConstantModel, TDSData, fit, simulate
from ase_tds.covariance import UnstableError

from conftest import ni_conventional

FAST = dict(dw_mesh=4, grid=(5, 5, 5))


@pytest.fixture(scope="module")
def truth():
    model = ForceConstantModel(ni_conventional(), shells=2)
    return model.set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59, "2XX": -0.24, "2YY": 0.03})


def _points(n, seed=0):
    hkl = np.random.default_rng(seed).uniform(-3, 3, size=(n, 3))
    return hkl[np.abs(hkl - np.round(hkl)).max(axis=1) > 0.15]  # away from every integer hkl


def _start(truth, factor=0.8):
    return ForceConstantModel(ni_conventional(), shells=2).set_parameters(factor * truth.theta.detach().numpy())


@pytest.mark.parametrize("scale, background", [("fixed", "none"), ("free", "free")])
def test_noise_free_recovery(truth, scale, background):
    data = simulate(truth, _points(300), 300.0, method="one-phonon", statistics="classical", tds_options=FAST)
    if scale == "free":  # arbitrary units: a scale and a background the fit must undo
        data = TDSData.from_hkl(data.hkl, 3.7 * data.intensity + 0.5, data.cell, temperature=300.0)
    model = _start(truth)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, data, method="one-phonon", statistics="classical", scale=scale, background=background,
                     tds_options=FAST, progress=False)
    assert any("scale is free" in str(w.message) for w in caught) == (scale == "free")
    np.testing.assert_allclose(model.theta.detach().numpy(), truth.theta.detach().numpy(), atol=1e-5)
    if scale == "free":
        assert result.scale == pytest.approx(3.7, rel=1e-5) and result.background == pytest.approx(0.5, abs=1e-4)
        assert any("scale is free" in note for note in result.warnings)
    assert result.chi2_red < 1e-6


def test_noisy_fit_has_honest_uncertainties(truth, tmp_path):
    rng = np.random.default_rng(5)
    data = simulate(truth, _points(600, seed=1), 300.0, method="gaussian", statistics="quantum", counts=1e4,
                    rng=rng, tds_options=FAST)
    model = _start(truth, 0.7)
    checkpoint = tmp_path / "fit.ckpt"
    result = fit(model, data, scale="fixed", background="none", tds_options=FAST, progress=False,
                 checkpoint=checkpoint)
    assert result.chi2_red == pytest.approx(1.0, abs=0.15)
    pulls = (result.theta - truth.theta.detach().numpy()) / result.sigma
    assert np.all(np.abs(pulls) < 4), pulls
    assert np.all(np.abs(np.diag(result.correlation) - 1) < 1e-12)
    saved = json.loads(checkpoint.read_text())["theta"]
    np.testing.assert_allclose(saved, result.theta, atol=1e-6)
    out = tmp_path / "fit.json"
    result.write_json(out)
    record = json.loads(out.read_text())
    assert [p["label"] for p in record["parameters"]] == truth.labels
    assert record["settings"]["statistics"] == "quantum" and "torch" in record["versions"]


def test_unstable_start_is_refused(truth):
    data = simulate(truth, _points(100), 300.0, method="one-phonon", statistics="classical", tds_options=FAST)
    model = ForceConstantModel(ni_conventional(), shells=2).set_from_bvk({"1XX": -1.0, "1XY": -1.0})
    with pytest.raises(UnstableError, match="starting force constants are dynamically unstable"):
        fit(model, data, method="one-phonon", statistics="classical", tds_options=FAST, progress=False)


def test_fixed_scale_needs_absolute_data(truth):
    data = simulate(truth, _points(100), 300.0, method="one-phonon", statistics="classical", tds_options=FAST)
    relative = TDSData.from_hkl(data.hkl, data.intensity, data.cell, temperature=300.0)
    with pytest.raises(ValueError, match="needs absolute data"):
        fit(_start(truth), relative, scale="fixed", tds_options=FAST, progress=False)


def test_too_few_points(truth):
    data = simulate(truth, _points(100)[:5], 300.0, method="one-phonon", statistics="classical", tds_options=FAST)
    with pytest.raises(ValueError, match="data points are used for 5 parameters"):
        fit(_start(truth), data, tds_options=FAST, progress=False)
