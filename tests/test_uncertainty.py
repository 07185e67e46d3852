"""What the data determine: named combinations, honest 1σ where they are undetermined, the prior, frequency 1σ.

Independent routes: data along one line of reciprocal space (whose blind combinations follow from the physics: only
longitudinal [100] modes are seen), the truth that made the data (pulls), and Monte-Carlo propagation of θ's
covariance to the frequencies.
"""

import copy
import warnings

import numpy as np
import pytest

from ase_tds import ForceConstantModel, fit, simulate
from ase_tds.data import add_poisson_noise
from ase_tds.uncertainty import frequency_sigma, parameter_combinations

from conftest import ni_conventional

FAST = dict(dw_mesh=4, grid=(5, 5, 5))


@pytest.fixture(scope="module")
def truth():
    return ForceConstantModel(ni_conventional(), shells=2).set_from_bvk(
        {"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59, "2XX": -0.24, "2YY": 0.03})


@pytest.fixture(scope="module")
def line_data(truth):
    """Points on (h 0 0) only: Q ∥ q ∥ [100] sees the longitudinal [100] branch alone."""
    rng = np.random.default_rng(0)
    h = rng.uniform(0.2, 5, 300)
    h = h[np.abs(h - np.round(h)) > 0.1]
    data = simulate(truth, np.column_stack([h, 0 * h, 0 * h]), 300.0, method="one-phonon", statistics="classical",
                    tds_options=FAST)
    return add_poisson_noise(data, 1e5, rng)


def _fit(truth, data, **kwargs):
    model = ForceConstantModel(ni_conventional(), shells=2).set_parameters(0.8 * truth.theta.detach().numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(model, data, method="one-phonon", statistics="classical", tds_options=FAST, progress=False, **kwargs)


def test_combinations_of_a_known_matrix():
    """Precision diag(10⁴, 0) in the basis (θ1 + θ2, θ1 − θ2)/√2: the difference is undetermined, the sum at 0.01."""
    basis = np.array([[1, 1], [1, -1]]) / np.sqrt(2)
    combos = parameter_combinations(["A", "B"], np.array([1.0, 1.0]), basis @ np.diag([1e4, 0.0]) @ basis.T)
    assert [c["determined"] for c in combos] == [False, True]
    assert combos[0]["sigma"] == np.inf and combos[1]["sigma"] == pytest.approx(0.01)
    assert combos[0]["text"] == "+0.71·A -0.71·B" and combos[1]["text"] == "+0.71·A +0.71·B"


def test_a_line_of_data_names_what_it_cannot_see_and_says_so_in_sigma(truth, line_data):
    result = _fit(truth, line_data)
    true = truth.theta.detach().numpy()
    blind = [c for c in result.combinations if not c["determined"]]
    assert len(blind) == 2  # 1ZZ, 1XY, 2YY enter the transverse branches; only two combinations of them are hidden
    for combo in blind:
        assert abs(combo["weights"]["1XX"]) < 0.05 and abs(combo["weights"]["2XX"]) < 0.05
        assert any(combo["text"] in note for note in result.warnings)
    # 1σ honest: the hidden parameters get a huge σ (a pseudo-inverse gave 3·10⁻⁴ eV/Å², 3000σ off), the seen ones
    # a small one that covers the truth
    pulls = (result.theta - true) / result.sigma
    assert np.all(np.abs(pulls) <= 3)
    seen = [result.labels.index(k) for k in ("1XX", "2XX")]
    assert np.all(result.sigma[seen] < 0.01) and np.all(np.delete(result.sigma, seen) > 1.0)


def test_a_prior_holds_the_hidden_combinations_near_the_start(truth, line_data):
    start = 0.8 * truth.theta.detach().numpy()
    result = _fit(truth, line_data, prior_sigma=0.05)
    assert result.settings["prior_sigma"] == 0.05
    for combo in result.combinations:
        v = np.array([combo["weights"][k] for k in result.labels])
        if not combo["determined"]:  # stays within the prior of the start, with about the prior's 1σ
            assert abs(v @ (result.theta - start)) <= 3 * 0.05
            assert 0.02 < np.sqrt(v @ result.covariance @ v) <= 0.05 * 1.01
    true = truth.theta.detach().numpy()
    for label in ("1XX", "2XX"):  # the seen ones converge as without the prior
        k = result.labels.index(label)
        assert abs(result.theta[k] - true[k]) <= 3 * result.sigma[k] and result.sigma[k] < 0.01
    with pytest.raises(ValueError, match="prior_sigma must be a positive width"):
        _fit(truth, line_data, prior_sigma=-1.0)


def test_frequency_sigma_matches_monte_carlo(truth):
    """First-order propagation against sampling θ from its covariance (small errors: the linear regime)."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 5)) * 0.004
    covariance = a @ a.T
    q = truth.q_from_hkl([[0.3, 0.1, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    predicted = frequency_sigma(truth, q, covariance)
    work = copy.deepcopy(truth)
    theta = truth.theta.detach().numpy()
    draws = np.stack([work.set_parameters(t).frequencies(q)
                      for t in rng.multivariate_normal(theta, covariance, size=1500)])
    np.testing.assert_allclose(predicted, draws.std(axis=0), rtol=0.1)
    assert np.all(predicted > 0)


def test_a_misfit_is_reported_and_widens_the_error_bars(truth):
    """Data whose noise is 3× the σ they state: χ²_red ≈ 9, named, and 1σ scaled by √χ²_red ≈ 3, so that the
    pulls are those of honest error bars again (a fit sure of a wrong answer is what this guards against)."""
    rng = np.random.default_rng(4)
    h = rng.uniform(-3, 3, size=(600, 3))
    h = h[np.abs(h - np.round(h)).max(axis=1) > 0.15]
    clean = simulate(truth, h, 300.0, method="one-phonon", statistics="classical", tds_options=FAST)
    sigma = 0.003 * clean.intensity
    noisy = clean.intensity + 3 * sigma * rng.normal(size=len(h))
    data = type(clean).from_hkl(h, noisy, clean.cell, sigma=sigma, temperature=300.0, units="e.u./atom")
    result = _fit(truth, data)
    assert 6 < result.chi2_red < 12
    assert any("χ²_red" in note and "standard deviations of χ²" in note for note in result.warnings)
    honest = _fit(truth, type(clean).from_hkl(h, noisy, clean.cell, sigma=3 * sigma, temperature=300.0,
                                               units="e.u./atom"))
    np.testing.assert_allclose(result.sigma, honest.sigma, rtol=0.15)
