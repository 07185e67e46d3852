"""The inversion recovers known force constants from synthetic data (independent: the truth that made them)."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from ase_tds import ForceConstantModel, Optimizer, TDSData, fit, simulate, tds_model
from ase_tds.background import ComptonShape
from ase_tds.covariance import UnstableError
from ase_tds.data import add_poisson_noise
from ase_tds.fitting import FitResult
from ase_tds.fitting.objective import Objective
from ase_tds.sampling import DenseSampler

from conftest import ni_conventional

FAST = dict(dw_mesh=4, grid=(5, 5, 5))


@pytest.fixture(scope="module")
def truth():
    model = ForceConstantModel(ni_conventional(), shells=2)
    return model.set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59, "2XX": -0.24, "2YY": 0.03})


def _points(n, seed=0):
    hkl = np.random.default_rng(seed).uniform(-3, 3, size=(n, 3))
    return hkl[np.abs(hkl - np.round(hkl)).max(axis=1) > 0.15]  # away from every integer hkl


def _grid_points(repeat, n, seed=0):
    """n hkl on the 1/repeat grid (Q a repeat³ supercell supports), |hkl| ≤ 3, each off integer hkl."""
    grid = np.stack(np.meshgrid(*3 * [np.arange(-3 * repeat, 3 * repeat + 1) / repeat], indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    grid = grid[np.abs(grid - np.round(grid)).max(axis=1) > 0.2]
    return grid[np.random.default_rng(seed).choice(len(grid), n, replace=False)]


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


@pytest.mark.parametrize("method", ["one-phonon", "gaussian", "sampling"])
def test_unstable_start_is_refused(truth, method, tmp_path):
    """Refused before any step, with where it is unstable (a mesh's most imaginary mode), θ left as given."""
    data = simulate(truth, _points(100), 300.0, method="one-phonon", statistics="classical", tds_options=FAST)
    model = ForceConstantModel(ni_conventional(), shells=2).set_from_bvk({"1XX": -1.0, "1XY": -1.0})
    before = model.theta.detach().numpy().copy()
    options = dict(FAST, sampler=DenseSampler(model, (3, 3, 3), 300.0, seed=0)) if method == "sampling" else FAST
    if method == "sampling":
        data = TDSData.from_hkl(_grid_points(3, 20), np.ones(20), data.cell, temperature=300.0)
    with pytest.raises(UnstableError, match=r"starting force constants are dynamically unstable: imaginary "
                                            r"frequency \d+\.\d+i THz at hkl"):
        fit(model, data, method=method, statistics="classical", tds_options=options, progress=False)
    np.testing.assert_array_equal(model.theta.detach().numpy(), before)
    if method == "one-phonon":  # the same where the first fit on a subset meets it (the one-phonon loss of all
        # the points evaluates nothing when it is built)
        with pytest.raises(UnstableError, match="starting force constants are dynamically unstable: imaginary"):
            fit(model, data, method=method, statistics="classical", tds_options=options, progress=False,
                optimizer=Optimizer(first_fit_points=20))
        np.testing.assert_array_equal(model.theta.detach().numpy(), before)
    if method == "one-phonon":  # the same from a checkpoint (of one iteration, its θ then made unstable)
        stable = _start(truth)
        fit(_start(truth), data, method=method, statistics="classical", tds_options=options, progress=False,
            checkpoint=tmp_path / "ckpt.json", optimizer=Optimizer(max_iter=1))
        saved = json.loads((tmp_path / "ckpt.json").read_text())
        (tmp_path / "ckpt.json").write_text(json.dumps(dict(saved, theta=before.tolist())))
        with pytest.raises(UnstableError, match="unstable \\(θ from the checkpoint"):
            fit(stable, data, method=method, statistics="classical", tds_options=options, progress=False,
                checkpoint=tmp_path / "ckpt.json")


def test_fixed_scale_needs_absolute_data(truth):
    data = simulate(truth, _points(100), 300.0, method="one-phonon", statistics="classical", tds_options=FAST)
    relative = TDSData.from_hkl(data.hkl, data.intensity, data.cell, temperature=300.0)
    with pytest.raises(ValueError, match="needs absolute data"):
        fit(_start(truth), relative, scale="fixed", tds_options=FAST, progress=False)


def test_too_few_points(truth):
    data = simulate(truth, _points(100)[:5], 300.0, method="one-phonon", statistics="classical", tds_options=FAST)
    with pytest.raises(ValueError, match="data points are used for 5 parameters"):
        fit(_start(truth), data, tds_options=FAST, progress=False)


# ---- Compton background ------------------------------------------------------------------------------------


def test_compton_shape_matches_hubbell():
    """Hubbell et al. (1975) S(x) as xraylib 4.3.0's SF_Compt gives it, off our table's grid (x = |Q|/4π Å⁻¹)."""
    reference = {("C", 0.33): 3.845096, ("Ni", 0.2387): 6.802864, ("Ni", 0.77): 17.240394, ("Au", 1.3): 44.947876}
    for (symbol, x), value in reference.items():
        assert ComptonShape([symbol])(np.array([4 * np.pi * x]))[0] == pytest.approx(value, rel=3e-3)
    shape = ComptonShape(["Ni", "C"])  # the per-atom mean; 0 at Q = 0, → mean Z at large Q
    np.testing.assert_allclose(shape(np.array([0.0, 4 * np.pi * 8])), [0.0, 17.0], rtol=0.01, atol=1e-12)
    recoil = ComptonShape(["Ni"], energy_kev=20.0)(np.array([8.0])) / ComptonShape(["Ni"])(np.array([8.0]))
    assert recoil[0] == pytest.approx(1 / (1 + 0.0038107 * 64 / 20) ** 2, rel=1e-4)  # Breit–Dirac (E'/E)²
    with pytest.raises(ValueError, match="covers 0 ≤ |Q|"):
        shape(np.array([200.0]))


def test_compton_amplitude_is_recovered(truth):
    """Absolute data plus a constant and a Compton term: both amplitudes and θ come back (noise-free)."""
    data = simulate(truth, _points(300), 300.0, method="one-phonon", statistics="classical", tds_options=FAST)
    compton = ComptonShape(["Ni"])(data.q_norm)
    data = dataclasses.replace(data, intensity=data.intensity + 0.5 + 0.9 * compton)
    model = _start(truth)
    result = fit(model, data, method="one-phonon", statistics="classical", scale="fixed", compton=True,
                 tds_options=FAST, progress=False)
    np.testing.assert_allclose(result.theta, truth.theta.detach().numpy(), atol=1e-5)
    assert (result.scale, result.background, result.compton) == pytest.approx((1.0, 0.5, 0.9), rel=1e-5)
    np.testing.assert_allclose(result.calculated(data.intensity * 0, data.q_norm), 0.5 + 0.9 * compton, rtol=1e-5)
    assert "Compton amplitude 0.9" in result.table() and result.to_dict()["settings"]["compton"] is True
    with pytest.raises(ValueError, match="compton=True"):
        fit(model, data, background="compton", tds_options=FAST, progress=False)


# ---- Poisson deviance --------------------------------------------------------------------------------------


def test_poisson_gradient_of_the_profiled_deviance(truth):
    """∂/∂θ of the deviance with (s, b, A) re-optimised at every θ, against central differences of that loss."""
    data = simulate(truth, _points(200), 300.0, method="one-phonon", statistics="classical", counts=50, rng=3,
                    tds_options=FAST)
    data = dataclasses.replace(data, units=None)
    tds = tds_model(_start(truth, 0.9), 300.0, method="one-phonon", statistics="classical", **FAST)
    objective = Objective(tds, data, "free", "free", "poisson", compton=True)
    theta = tds.force_constants.theta.detach().numpy().copy()
    value, grad, beta = objective.evaluate(theta)
    assert len(beta) == 3
    for k in (0, 3):
        step = np.zeros_like(theta)
        step[k] = 1e-5
        numeric = (objective.evaluate(theta + step)[0] - objective.evaluate(theta - step)[0]) / 2e-5
        assert grad[k] == pytest.approx(numeric, rel=1e-5)


def test_poisson_fit_recovers_theta_at_low_counts(truth):
    """3 counts at the mean intensity (≈ 10 % of the points at zero counts): honest θ, χ²_red ≈ 1, and the
    profiled scale equals the closed-form Poisson estimate Σn / Σ t·I(θ)."""
    exact = simulate(truth, _points(300, seed=1), 300.0, method="one-phonon", statistics="classical",
                     tds_options=FAST)
    exposure = 3.0 / exact.intensity.mean()  # add_poisson_noise: counts = exposure · I_obs
    data = add_poisson_noise(exact, 3.0, rng=0)
    assert 0.05 < np.mean(data.intensity == 0) < 0.2
    model = _start(truth)
    result = fit(model, data, method="one-phonon", statistics="classical", scale="fixed", background="none",
                 loss="poisson", tds_options=FAST, progress=False)
    pulls = (result.theta - truth.theta.detach().numpy()) / result.sigma
    assert np.all(np.abs(pulls) < 4), pulls
    assert result.chi2_red == pytest.approx(1.0, abs=0.2) and result.deviance > 0
    # with a free scale the profiled Poisson scale has a closed form, Σn / Σ t·I(θ): against the Newton profile
    tds = tds_model(model, 300.0, method="one-phonon", statistics="classical", **FAST)
    objective = Objective(tds, dataclasses.replace(data, units=None), "free", "none", "poisson")
    np.testing.assert_allclose(objective.exposure.numpy(), exposure, rtol=1e-10)  # inferred from I/σ², zeros too
    with torch.no_grad():
        calc = tds(data.q)
    assert objective.profile(calc)[0] == pytest.approx(data.intensity.sum() / calc.sum().item(), rel=1e-10)
    with pytest.raises(ValueError, match="needs the counts"):
        fit(model, dataclasses.replace(data, sigma=None), loss="poisson", scale="fixed", tds_options=FAST)


# ---- checkpoints -------------------------------------------------------------------------------------------


def test_interrupted_fit_resumes_to_the_same_theta(truth, tmp_path):
    """3 L-BFGS iterations, then a new fit() on the checkpoint: the θ of an uninterrupted fit, to 1e-3 σ."""
    data = simulate(truth, _points(300, seed=2), 300.0, method="one-phonon", statistics="classical", counts=1e4,
                    rng=4, tds_options=FAST)
    kwargs = dict(method="one-phonon", statistics="classical", scale="fixed", background="none", tds_options=FAST,
                  progress=False)
    whole = fit(_start(truth, 0.7), data, **kwargs)
    checkpoint = tmp_path / "fit.ckpt"
    first = fit(_start(truth, 0.7), data, optimizer=Optimizer(max_iter=3), checkpoint=checkpoint, **kwargs)
    assert first.iterations == 3 and np.abs(first.theta - whole.theta).max() > 10 * whole.sigma.max()
    resumed = fit(_start(truth, 1.1), data, checkpoint=checkpoint, **kwargs)  # its own start is not used
    assert resumed.iterations > 3 and resumed.history[:4] == first.history[:4]
    np.testing.assert_allclose(resumed.theta, whole.theta, rtol=0, atol=1e-3 * whole.sigma.min())
    with pytest.raises(ValueError, match="other settings \\(loss: 'chi2' there, 'poisson' now"):
        fit(_start(truth), data, checkpoint=checkpoint, **dict(kwargs, loss="poisson"))
    other = dataclasses.replace(data, intensity=data.intensity * 1.01)  # other data: its fingerprint differs
    with pytest.raises(ValueError, match="other settings \\(data: "):
        fit(_start(truth), other, checkpoint=checkpoint, **kwargs)
    with pytest.raises(ValueError, match="a checkpoint of a model with parameters"):
        fit(ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.5, "1XY": 1.6}), data,
            checkpoint=checkpoint, **kwargs)
    # a checkpoint written before a setting existed (here "optimizer") resumes: the setting had its default
    saved = json.loads(checkpoint.read_text())
    del saved["settings"]["optimizer"]
    checkpoint.write_text(json.dumps(saved))
    again = fit(_start(truth, 1.1), data, checkpoint=checkpoint, **kwargs)
    np.testing.assert_allclose(again.theta, resumed.theta, rtol=0, atol=1e-12)


# ---- the sampling model (Adam) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(truth):
    """80 Q on the 1/3 grid, intensities of a 3×3×3-cell DenseSampler of the truth (8 samples, seed 0), σ = 1 %.

    The fitted model samples with the same seed (common random numbers): the loss is a smooth function of θ
    whose minimum is exactly the truth.
    """
    sampler = DenseSampler(truth, (3, 3, 3), 300.0, n_samples=8, seed=0, progress=False)
    data = simulate(truth, _grid_points(3, 80), 300.0, method="sampling", statistics="classical",
                    tds_options=dict(sampler=sampler))
    return dataclasses.replace(data, sigma=0.01 * data.intensity)


def _fit_sampled(model, data, **kwargs):
    sampler = DenseSampler(model, (3, 3, 3), 300.0, n_samples=8, seed=0, progress=False)
    return fit(model, data, method="sampling", statistics="classical", scale="fixed", background="none",
               tds_options=dict(sampler=sampler), **kwargs)


def test_sampling_fit_converges_and_resumes_exactly(truth, sampled, tmp_path, capsys):
    """Adam from 0.8 × truth: 20 iterations cut the largest θ error ≥ 10×; 12 + 8 resumed is the same run."""
    true = truth.theta.detach().numpy()
    result = _fit_sampled(_start(truth), sampled, optimizer=Optimizer(max_iter=20), progress=True)
    assert "fit (Adam)" in capsys.readouterr().err  # the progress bar
    error0, error = np.abs(0.8 * true - true).max(), np.abs(result.theta - true).max()
    assert result.iterations == 20 and error < error0 / 10, (error0, error)
    assert np.all(np.isfinite(result.sigma) & (result.sigma > 0)) and len(result.history) == 21
    assert max(min(result.history), result.chi2) < 1e-3 * result.history[0]
    checkpoint = tmp_path / "adam.ckpt"
    _fit_sampled(_start(truth), sampled, optimizer=Optimizer(max_iter=12), checkpoint=checkpoint, progress=False)
    resumed = _fit_sampled(_start(truth), sampled, optimizer=Optimizer(max_iter=20), checkpoint=checkpoint, progress=False)
    np.testing.assert_allclose(resumed.theta, result.theta, rtol=0, atol=1e-12)
    assert resumed.iterations == 20 and resumed.history == result.history


def test_sampling_fit_stops_at_the_minimum(truth, sampled):
    """Started at the truth (the exact minimum under common random numbers): stops after one evaluation."""
    result = _fit_sampled(_start(truth, 1.0), sampled, optimizer=Optimizer(max_iter=20), progress=False)
    assert result.iterations == 1 and result.chi2 < 1e-12
    np.testing.assert_allclose(result.theta, truth.theta.detach().numpy(), atol=1e-12)


def test_sampling_fit_by_lbfgs_reaches_the_exact_minimum(truth, sampled):
    """optimizer="lbfgs" on the seeded (deterministic) sampling loss: from 0.8 × truth to the truth (its exact
    minimum under common random numbers) to 1e-6 of |θ|, in fewer iterations than Adam needs for 10×."""
    true = truth.theta.detach().numpy()
    result = _fit_sampled(_start(truth), sampled, optimizer=Optimizer("lbfgs", max_iter=40), progress=False)
    assert result.settings["optimizer"] == "lbfgs" and result.iterations < 20
    note = [n for n in result.warnings if "distinct q of the supercell" in n]  # 80 points, a 3×3×3 supercell
    assert len(note) == 1 and int(note[0].split(" points on ")[1].split()[0]) < 27
    assert np.abs(result.theta - true).max() < 1e-6 * np.abs(true).max()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        _fit_sampled(_start(truth), sampled, optimizer="newton")


def test_monte_carlo_weights_add_the_sampled_variance(truth):
    """The sampling model's weights at θ (Objective(..., theta=θ)): w = 1/(σ² + (r·I_obs)²), r = stderr/mean of the
    sampler at θ; finite at Q = 0 (every sample scatters alike there: mean and standard error exactly 0, r = 0) and
    where the mean is ≤ 0 (r = the median of the others)."""
    sampler = DenseSampler(truth, (3, 3, 3), 300.0, n_samples=8, seed=0, progress=False)
    hkl = np.vstack([[[0, 0, 0]], _grid_points(3, 20)])
    data = simulate(truth, hkl, 300.0, method="sampling", statistics="classical", tds_options=dict(sampler=sampler))
    data = dataclasses.replace(data, sigma=data.sigma + 1e-3)
    tds = tds_model(truth, 300.0, method="sampling", statistics="classical", sampler=sampler)
    q = torch.as_tensor(data.q[data.mask])  # the points the loss uses
    with torch.no_grad():
        mean, stderr = (x.numpy() for x in tds.intensity(q))
    assert mean[0] == 0 and stderr[0] == 0 and np.all(mean[1:] > 0)
    mean[1] = -mean[1]  # a point whose sampled mean came out negative (Bragg part subtracted)
    sampler.intensity = lambda *args, **kwargs: (torch.as_tensor(mean), torch.as_tensor(stderr))
    objective = Objective(tds, data, "free", "none", "chi2", theta=truth.theta.detach().numpy())  # weights at θ
    relative = np.divide(stderr, np.abs(mean), out=np.zeros_like(stderr), where=mean != 0)  # 0 at Q = 0
    relative[1] = np.median(relative[2:])
    expected = 1.0 / (data.sigma**2 + (relative * data.intensity) ** 2)
    np.testing.assert_allclose(objective.w.numpy(), expected, rtol=1e-12)
    del sampler.intensity  # the sampler's own again
    assert np.isfinite(objective.evaluate(truth.theta.detach().numpy())[0])


class _Cliff:
    """A loss (θ − 2)² whose crystal is unstable beyond θ = 1: the minimum lies past the cliff."""

    def evaluate(self, theta):
        if theta[0] > 1.0:
            raise UnstableError("beyond the cliff")
        return float((theta[0] - 2.0) ** 2), np.array([2 * (theta[0] - 2.0)]), None


def test_lbfgs_keeps_the_best_theta_and_reports_a_stall():
    """L-BFGS towards a minimum past an unstable region: the returned θ is the lowest loss seen (not the start),
    and the status says it stalled, not converged."""
    from ase_tds.fitting.optimizers import LBFGS, minimise

    settings = Optimizer("lbfgs", max_iter=50)
    state, status = minimise(_Cliff(), settings, LBFGS.start(np.array([0.0]), np.eye(1), [4.0], settings))
    theta, iterations = state.theta, state.iterations
    assert 0.0 < theta[0] <= 1.0 and (theta[0] - 2) ** 2 < 4.0
    assert status["converged"] is False and "stalled" in status["reason"], status


def test_lbfgs_status_tells_convergence_from_a_stall():
    from types import SimpleNamespace

    from ase_tds.fitting.optimizers.lbfgs import lbfgs_status as _lbfgs_status

    done = SimpleNamespace(status=0, message="CONVERGENCE: REL_REDUCTION_OF_F_<=_FACTR*EPSMCH", nit=12)
    assert _lbfgs_status(done, np.zeros(3), 200) == {"converged": True,
                                                     "reason": "relative change of the loss below its tolerance"}
    limit = SimpleNamespace(status=1, message="STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT", nit=200)
    assert not _lbfgs_status(limit, np.ones(3), 200)["converged"]
    abnormal = SimpleNamespace(status=2, message="ABNORMAL_TERMINATION_IN_LNSRCH", nit=0)
    assert _lbfgs_status(abnormal, np.array([1e-4]), 200)["converged"]  # at the minimum within round-off
    stalled = _lbfgs_status(abnormal, np.array([3.0]), 200)
    assert not stalled["converged"] and stalled["reason"].startswith("stalled at the start")


def test_optimizer_settings_are_one_object(truth, tmp_path):
    """fit(..., optimizer=Optimizer(max_iter=2)) stops after 2 iterations; options after `data` are keyword-only,
    and the removed max_iter= keyword is refused."""
    data = simulate(truth, np.random.default_rng(3).uniform(-2, 2, size=(80, 3)), 300.0, method="one-phonon",
                    statistics="classical")
    options = dict(method="one-phonon", statistics="classical", scale="fixed", background="none", progress=False)
    new = fit(_start(truth), data, optimizer=Optimizer(max_iter=2), **options)
    assert new.iterations == 2 and new.settings["optimizer"] == "lbfgs"
    with pytest.raises(TypeError):
        fit(_start(truth), data, 300.0)
    with pytest.raises(TypeError):
        fit(_start(truth), data, max_iter=2, **options)
    with pytest.raises(ValueError, match="max_iter must be a whole number"):
        Optimizer(max_iter=-1)


def test_fit_result_save_writes_the_fit_folder_all_or_nothing(truth, tmp_path, monkeypatch):
    """FitResult.save writes the files `ase-tds fit` writes (the CLI calls it); a failure while drawing leaves no
    file and no temporary folder behind."""
    import phonopy

    import ase_tds.report as report

    data = simulate(truth, np.random.default_rng(4).uniform(-2, 2, size=(60, 3)), 300.0, method="one-phonon",
                    statistics="classical")
    model = _start(truth)
    result = fit(model, data, method="one-phonon", statistics="classical", scale="fixed", background="none",
                 progress=False)
    result.save(tmp_path / "out", model, data, start=_start(truth))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "phonopy_params.yaml", "FORCE_CONSTANTS", "force_constants.hdf5", "fit.json", "data.h5", "dispersion.png",
        "tds_fit.png", "identifiability.png"}
    assert FitResult.from_dict(json.loads((tmp_path / "out" / "fit.json").read_text())).labels == result.labels
    ph = phonopy.load(tmp_path / "out" / "phonopy_params.yaml", produce_fc=False, log_level=0)
    assert np.abs(ph.force_constants).max() > 0
    monkeypatch.setattr(report, "draw_tds_fit", lambda *args: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        result.save(tmp_path / "broken", model, data)
    assert list((tmp_path / "broken").iterdir()) == []


def test_a_first_fit_on_a_subset_ends_at_the_fit_of_all_the_points(truth, tmp_path):
    """3000 noisy points from a poor start: first on a random 1000, then on all 3000 from there. The minimum is that
    of all the points (the fit without a first fit, to a small fraction of 1σ), the record says what was done, and
    an interrupted fit resumes from its checkpoint (without fitting the subset again) to the same minimum."""
    data = simulate(truth, _points(3200, seed=2), 300.0, method="one-phonon", statistics="classical", counts=1e4,
                    rng=np.random.default_rng(6), tds_options=FAST)
    options = dict(method="one-phonon", statistics="classical", scale="fixed", background="none", tds_options=FAST,
                   progress=False)
    direct = fit(_start(truth, 0.6), data, optimizer=Optimizer(first_fit_points=None), **options)
    assert "first_fit" not in direct.settings
    staged = fit(_start(truth, 0.6), data, optimizer=Optimizer(first_fit_points=1000), **options)
    first = staged.settings["first_fit"]
    assert first["points"] == 1000 and first["iterations"] > 0 and first["status"]["converged"]
    assert staged.n_points == direct.n_points > 2000 and staged.status["converged"]
    np.testing.assert_allclose(staged.theta, direct.theta, rtol=0, atol=0.02 * direct.sigma.min())
    np.testing.assert_allclose(staged.sigma, direct.sigma, rtol=1e-3)
    assert staged.iterations < direct.iterations  # from the subset's minimum, only the last steps
    checkpoint = tmp_path / "fit.ckpt"
    stopped = fit(_start(truth, 0.6), data, optimizer=Optimizer(first_fit_points=1000, max_iter=2),
                  checkpoint=checkpoint, **options)
    assert stopped.iterations == 2 and not stopped.status["converged"]
    resumed = fit(_start(truth, 0.6), data, optimizer=Optimizer(first_fit_points=1000), checkpoint=checkpoint,
                  **options)
    assert "first_fit" not in resumed.settings and resumed.status["converged"]
    np.testing.assert_allclose(resumed.theta, direct.theta, rtol=0, atol=0.02 * direct.sigma.min())
    with pytest.raises(ValueError, match="first_fit_points must be a whole number of points ≥ 1"):
        Optimizer(first_fit_points=0)
    assert Optimizer(first_fit_points=1e5).first_fit_points == 100_000
    with pytest.raises(ValueError, match=r"first_fit_points \(3\) must be more than the 5 free parameters"):
        fit(_start(truth, 0.6), data, optimizer=Optimizer(first_fit_points=3), **options)


def test_a_grid_chosen_at_a_stiff_start_is_chosen_again_where_the_fitted_model_needs_a_finer_one(truth):
    """The gaussian model's grid and crystals are chosen at the start θ. From a start 1.6× too stiff they are too
    coarse for the softer fitted model (its own error exceeds σ/5 on more points than at the start): the fit goes on
    from its θ with them chosen there (more points on larger crystals), records the first pass, and warns of nothing;
    a fit from the truth needs no second pass."""
    options = dict(scale="fixed", background="none", tds_options=dict(accuracy=1e-2), progress=False)
    data = simulate(truth, _points(600, seed=1), 300.0, counts=1e6, rng=np.random.default_rng(5),
                    tds_options=dict(accuracy=1e-2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(_start(truth, 1.6), data, **options)
    assert not any("at the fitted θ" in str(w.message) for w in caught)
    first = result.settings["refit"]["first_pass"]
    assert first["model_error"]["fraction_above_fifth_sigma"] > result.model_error["fraction_above_fifth_sigma"]
    assert result.model_error["points_on_larger_crystals"] > first["model_error"]["points_on_larger_crystals"]
    assert "refit" not in fit(_start(truth, 1.0), data, **options).settings


def test_a_second_pass_is_asked_for_by_sigma_or_by_accuracy():
    """The rule of the fit's second pass: the model's own error at the fitted θ above σ/5 on more points than at the
    start, or above the accuracy by more than at the start; a model without a grid (no `at_start`) never."""
    from ase_tds.fitting.covariance import finer_model_needed

    start = dict(fraction_above_fifth_sigma=0.0, max_relative=5e-4)
    fitted = dict(start, at_start=dict(start))
    assert not finer_model_needed(fitted, 1e-3)
    assert finer_model_needed(dict(fitted, fraction_above_fifth_sigma=0.04), 1e-3)
    assert finer_model_needed(dict(fitted, max_relative=3e-3), 1e-3)  # Si from springs: 3.2e-3 at the fitted θ
    assert not finer_model_needed(dict(fitted, max_relative=3e-3), None)
    assert not finer_model_needed(dict(fitted, max_relative=3e-3, at_start=dict(start, max_relative=4e-3)), 1e-3)
    assert not finer_model_needed(dict(start), 1e-3)

