"""Temperature series: several data files at their own temperatures fitted jointly (ase_tds.fitting.series).

Independent routes: finite differences of the joint loss for its gradient; single-file fits for what a series must
reduce to (two files in a linear series are a change of variables of two separate fits; an independent series with a
negligible prior is separate fits); the truth that made the data for the pulls.
"""

import copy
import json
import warnings

import numpy as np
import phonopy
import pytest
from ase.io import write

from ase_tds import ForceConstantModel, TDSData, TDSError, fit, simulate, tds_model
from ase_tds.cli import main
from ase_tds.fitting import SeriesResult, fit_series
from ase_tds.fitting.objective import Objective
from ase_tds.fitting.series import SeriesObjective

from conftest import ni_conventional

FAST = dict(dw_mesh=4, grid=(5, 5, 5))
ONE_PHONON = dict(method="one-phonon", statistics="classical", scale="fixed", background="none", tds_options=FAST,
                  progress=False)
TEMPERATURES = (100.0, 300.0, 500.0)
RELATIVE_SLOPE = -3e-4  # per K: θ(T) = θ_300·(1 − 3·10⁻⁴·(T − 300)), of the size of nickel's


@pytest.fixture(scope="module")
def truth():
    """Nearest-neighbour fcc Ni at 300 K (3 parameters)."""
    return ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59})


def theta_at(truth, temperature: float) -> np.ndarray:
    theta = truth.theta.detach().numpy()
    return theta * (1 + RELATIVE_SLOPE * (temperature - 300.0))


@pytest.fixture(scope="module")
def series_data(truth):
    """One-phonon data at 100, 300 and 500 K of the linear truth, 1 % noise, each at its own points."""
    rng = np.random.default_rng(7)
    data = []
    for temperature in TEMPERATURES:
        hkl = rng.uniform(-3, 3, size=(260, 3))
        hkl = hkl[np.abs(hkl - np.round(hkl)).max(axis=1) > 0.15]
        model = copy.deepcopy(truth).set_parameters(theta_at(truth, temperature))
        data.append(simulate(model, hkl, temperature, method="one-phonon", statistics="classical", counts=1e4, rng=rng,
                             tds_options=FAST))
    return data


@pytest.fixture(scope="module")
def singles(truth, series_data):
    """Each file fitted alone (the single-file fit), by temperature."""
    return {d.temperature: fit(start(truth), d, **ONE_PHONON) for d in series_data}


def start(truth, factor=0.85):
    return copy.deepcopy(truth).set_parameters(factor * truth.theta.detach().numpy())


def objectives(truth, data):
    theta = truth.theta.detach().numpy()
    out = []
    for d in data:
        tds = tds_model(copy.deepcopy(truth), d.temperature, method="one-phonon", statistics="classical", **FAST)
        out.append(Objective(tds, d, "free", "free", "chi2", theta=theta))
    return out


@pytest.mark.parametrize("series", ["linear", "independent"])
def test_the_series_gradient_equals_finite_differences(truth, series_data, series):
    """The chain rule through θ_i = A_i x (and the prior's gradient) against central differences of the joint loss,
    scale and background profiled in every file."""
    temperatures = np.array(TEMPERATURES)
    joint = SeriesObjective(objectives(truth, series_data), temperatures, series, 290.0,
                            2e-4 if series == "independent" else None)
    rng = np.random.default_rng(1)
    theta = truth.theta.detach().numpy()
    if series == "linear":
        x = np.concatenate([theta * rng.uniform(0.9, 1.1, 3), 1e-4 * rng.normal(size=3)])
    else:
        x = np.concatenate([theta * rng.uniform(0.9, 1.1, 3) for _ in temperatures])
    value, grad, betas = joint.evaluate(x)
    assert len(betas) == 3
    steps = 1e-5 * np.maximum(np.abs(x), 1e-3)
    numeric = np.array([(joint.evaluate(x + step)[0] - joint.evaluate(x - step)[0]) / (2 * step[k])
                        for k, step in enumerate(np.diag(steps))])
    np.testing.assert_allclose(grad, numeric, rtol=2e-5, atol=1e-6 * np.abs(grad).max())
    files = sum(objective.evaluate(a @ x)[0] for objective, a in zip(joint.objectives, joint.maps))
    if series == "independent":  # the prior: Σ ((θ_{i+1} − θ_i)/(s·ΔT))²
        blocks = x.reshape(3, -1)
        prior = np.sum((np.diff(blocks, axis=0) / (2e-4 * np.diff(temperatures))[:, None]) ** 2)
        assert value - files == pytest.approx(prior, rel=1e-10)
    else:
        assert value == pytest.approx(files, rel=1e-12)


def test_a_linear_series_of_two_files_is_the_two_single_fits(truth, series_data, singles):
    """With two temperatures (θ₀, θ′) ↔ (θ₁, θ₂) is a change of variables: θ and 1σ at each temperature must be those
    of fitting each file alone, and θ′ = (θ₂ − θ₁)/ΔT with σ² = (σ₁² + σ₂²)/ΔT²."""
    pair = [series_data[0], series_data[2]]
    result = fit_series(start(truth), pair, **ONE_PHONON)
    alone = [singles[d.temperature] for d in pair]
    for i, single in enumerate(alone):
        np.testing.assert_allclose(result.theta[i], single.theta, atol=0.01 * single.sigma.min())
        np.testing.assert_allclose(result.theta_sigma[i], single.sigma, rtol=1e-3)
        assert result.files[i]["chi2"] == pytest.approx(single.chi2, rel=1e-4)
    delta = pair[1].temperature - pair[0].temperature
    n = len(truth.labels)
    np.testing.assert_allclose(result.parameters[n:], (alone[1].theta - alone[0].theta) / delta,
                               atol=0.01 * result.sigma[n:].min())
    np.testing.assert_allclose(result.sigma[n:], np.hypot(alone[0].sigma, alone[1].sigma) / delta, rtol=1e-3)
    assert result.reference_temperature == pytest.approx(300.0)


def test_a_linear_series_recovers_the_truth_and_narrows_the_middle(truth, series_data, singles):
    """θ₀ and θ′ within 3σ of the truth; θ at 300 K better determined than by the 300 K file alone."""
    result = fit_series(start(truth), list(reversed(series_data)), **ONE_PHONON)  # any order: sorted by temperature
    assert isinstance(result, SeriesResult) and result.trusted and result.status["converged"]
    assert list(result.temperatures) == list(TEMPERATURES)
    theta = truth.theta.detach().numpy()
    true = np.concatenate([theta, RELATIVE_SLOPE * theta])
    pulls = (result.parameters - true) / result.sigma
    assert np.all(np.abs(pulls) <= 3), pulls
    middle, middle_cov = result.theta_at(300.0)
    np.testing.assert_allclose(middle, result.theta[1], rtol=1e-12)
    assert np.all(np.sqrt(np.diag(middle_cov)) < singles[300.0].sigma)
    assert np.all(np.abs(result.theta - np.array([theta_at(truth, t) for t in TEMPERATURES])) <= 3 * result.theta_sigma)


def test_an_independent_series_with_a_loose_prior_is_the_single_fits_and_a_tight_one_ties_them(truth, series_data,
                                                                                                singles):
    """s large: each temperature fitted by its own file alone; s tiny: one θ for all temperatures."""
    loose = fit_series(start(truth), series_data, series="independent", smoothness=1e3, **ONE_PHONON)
    for i, d in enumerate(series_data):
        single = singles[d.temperature]
        np.testing.assert_allclose(loose.theta[i], single.theta, atol=0.01 * single.sigma.min())
        np.testing.assert_allclose(loose.theta_sigma[i], single.sigma, rtol=1e-3)
        pulls = (loose.theta[i] - theta_at(truth, d.temperature)) / loose.theta_sigma[i]
        assert np.all(np.abs(pulls) <= 3), pulls
    with pytest.raises(ValueError, match="only at its temperatures"):
        loose.theta_at(200.0)
    with warnings.catch_warnings(record=True) as caught:  # one θ for all: the truth's slope is a misfit, and said
        warnings.simplefilter("always")
        tight = fit_series(start(truth), series_data, series="independent", smoothness=1e-9, **ONE_PHONON)
    spread = np.ptp(tight.theta, axis=0)
    assert np.all(spread < 1e-3 * tight.theta_sigma.min(axis=0)), spread
    assert not tight.trusted and any("χ²_red" in str(w.message) for w in caught)
    assert tight.settings["smoothness"] == 1e-9 and tight.parameter_labels[0] == "1XX@100K"


def test_what_is_no_series_is_refused(truth, series_data):
    model = start(truth)
    same = TDSData.from_hkl(series_data[1].hkl, series_data[1].intensity, series_data[1].cell,
                            sigma=series_data[1].sigma, temperature=300.0, units="e.u./atom", source="again.h5")
    with pytest.raises(ValueError, match="both at 300 K"):
        fit_series(model, [series_data[1], same], **ONE_PHONON)
    unknown = TDSData.from_hkl(same.hkl, same.intensity, same.cell, sigma=same.sigma, units="e.u./atom",
                               source="cold.h5")
    with pytest.raises(TDSError, match="cold.h5: field 'temperature' is missing"):
        fit_series(model, [series_data[1], unknown], **ONE_PHONON)
    with pytest.raises(ValueError, match="two or more"):
        fit_series(model, series_data[:1], **ONE_PHONON)
    with pytest.raises(ValueError, match="prior of series='independent'"):
        fit_series(model, series_data, smoothness=1e-3, **ONE_PHONON)
    with pytest.raises(ValueError, match="one temperature at a time"):
        fit_series(model, series_data, **dict(ONE_PHONON, method="sampling"))
    with pytest.raises(ValueError, match="not for a temperature series"):
        fit(model, series_data, temperature=300.0, **ONE_PHONON)
    np.testing.assert_array_equal(model.theta.detach().numpy(), start(truth).theta.detach().numpy())


def test_the_command_fits_three_files_and_writes_the_series(truth, series_data, tmp_path, capsys):
    structure = tmp_path / "Ni.cif"
    write(structure, ni_conventional())
    paths = []
    for d in series_data:
        paths.append(tmp_path / f"ni_{d.temperature:g}.h5")
        d.write(paths[-1])
    out = tmp_path / "series"
    common = ["--shells", 1, "--model", "one-phonon", "--statistics", "classical", "--scale", "fixed",
              "--background", "none", "--start", "emt", "--grid", 5, 5, 5]
    code = main([str(a) for a in ("fit", structure, *reversed(paths), "--out", out, *common)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "fit.json").read_text())
    assert record["series"] == "linear" and record["temperatures"] == list(TEMPERATURES)
    assert [p["label"] for p in record["parameters"]] == truth.labels + [f"d{k}/dT" for k in truth.labels]
    assert record["parameters"][3]["unit"] == "eV/Å²/K"
    for entry in record["per_temperature"]:
        assert entry["chi2"] > 0 and entry["n_points"] > 0
        assert entry["source"].endswith(f"ni_{entry['temperature']:g}.h5")
        assert entry["phonopy_file"] == f"phonopy_params_{entry['temperature']:g}K.yaml"
        assert (out / entry["phonopy_file"]).is_file() and (out / f"data_{entry['temperature']:g}K.h5").is_file()
    hot = record["per_temperature"][-1]  # its file, as phonopy reads it, holds that temperature's θ
    written = ForceConstantModel.from_phonopy(phonopy.load(out / hot["phonopy_file"], log_level=0))
    assert written.labels == truth.labels
    np.testing.assert_allclose(written.theta.detach().numpy(), [p["value"] for p in hot["parameters"]], atol=1e-10)
    assert (out / "series.png").stat().st_size > 0
    code = main([str(a) for a in ("fit", structure, *paths, "--out", tmp_path / "other", *common,
                                  "--temperature", 300)])
    assert code == 2 and "--temperature: not for a temperature series" in capsys.readouterr().err
    code = main([str(a) for a in ("fit", structure, paths[0], "--out", tmp_path / "one", *common,
                                  "--series", "independent")])
    assert code == 2 and "give two or more data files" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() and not (tmp_path / "one").exists()
