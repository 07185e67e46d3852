"""A fit of converged data that ase_tds did not make is right about its own error.

Data: the independent reference of `reference_tds` (a 32³ periodic crystal's exact intensity, phonopy's eigen-solver),
from the published Born–von Kármán constants of nickel (296 K), at 800 points on that crystal's reciprocal lattice
(|Q| ≤ 8 Å⁻¹, > 0.1 r.l.u. from Bragg peaks), with Poisson noise. The fit uses every default (grid chosen by the
package, its own error folded in). The noise-free intensities must give θ within 0.3 σ of the truth (no bias
the error bars miss); one noisy set must give χ²_red within three standard deviations √(2/ν) of 1 and pulls
|θ − θ_true|/σ distributed as they should — in absolute units with the scale fixed by default, and in arbitrary
units with a scale and a background.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from ase.build import bulk

import reference_tds as ref
from ase_tds import ForceConstantModel, TDSData, fit
from ase_tds.data import add_poisson_noise

T = 296.0
MESH = (32, 32, 32)


@pytest.fixture(scope="module")
def truth():
    return ForceConstantModel(bulk("Ni", "fcc", a=ref.NI_A, cubic=True), shells=5).set_from_phonopy(
        ref.birgeneau_ni_phonopy())


@pytest.fixture(scope="module")
def converged_data(truth):
    ph = ref.birgeneau_ni_phonopy()
    conventional = np.eye(3) * ref.NI_A
    q = ref.commensurate_points(np.array(ph.primitive.cell), MESH, 800, 8.0, np.random.default_rng(2),
                                bragg_cell=conventional)
    intensity = ref.periodic_crystal_intensity(ph, q, MESH, T)
    hkl = q @ conventional.T / (2 * np.pi)
    return TDSData.from_hkl(hkl, intensity, conventional, temperature=T, units="e.u./atom")


def _start(truth):
    """The truth's nearest-neighbour constants × 0.8, the rest zero."""
    start = truth.parameter_dict()
    return ForceConstantModel(bulk("Ni", "fcc", a=ref.NI_A, cubic=True), shells=5).set_from_bvk(
        {k: 0.8 * v for k, v in start.items() if k.startswith("1")})


def _pulls(result, truth):
    return (result.theta - truth.theta.detach().numpy()) / result.sigma


def _check(noise_free, noisy, truth, label):
    """Bias: on the noise-free intensities (σ of the noisy set) every |θ − θ_true| ≤ 0.3 σ — the model's own error
    does not move θ by more than a fraction of its 1σ. Noise: χ²_red within 3√(2/ν) of 1 and Σ pull² below the
    99.9 % point of χ² with one degree per parameter (an honest 1σ; a single |pull| > 3 happens by chance in ~4 %
    of honest 16-parameter fits, so the sum is the sharper test); the largest |pull| is printed."""
    from scipy.stats import chi2

    bias = _pulls(noise_free, truth)
    pulls = _pulls(noisy, truth)
    nu = noisy.n_points - len(noisy.theta) - (noisy.settings["scale"] == "free") - (noisy.settings["background"] == "free")
    band = 3 * np.sqrt(2 / nu)
    print(f"{label}: bias ≤ {np.abs(bias).max():.2f} σ; noisy: χ²_red {noisy.chi2_red:.3f} (1 ± {band:.3f}), "
          f"Σ pull² {np.sum(pulls**2):.1f}, largest |pull| {np.abs(pulls).max():.2f}; model error "
          f"{noisy.model_error['median_relative']:.1e} median, grid {noisy.settings['grid']}")
    assert np.all(np.abs(bias) <= 0.3), dict(zip(truth.labels, np.round(bias, 2)))
    assert abs(noisy.chi2_red - 1) <= band
    assert np.sum(pulls**2) <= chi2.ppf(0.999, len(pulls))


def _fits(truth, data, noisy, **options):
    noise_free = dataclasses.replace(noisy, intensity=data.intensity)
    return [fit(_start(truth), d, progress=False, **options) for d in (noise_free, noisy)]


def test_absolute_data_fix_the_scale_and_the_pulls_are_honest(truth, converged_data):
    noisy = add_poisson_noise(converged_data, 4e4, np.random.default_rng(3))  # 0.5 % at the mean intensity
    noise_free, result = _fits(truth, converged_data, noisy, background="none")
    assert result.settings["scale"] == "fixed" and result.scale == 1.0
    _check(noise_free, result, truth, "absolute, scale fixed by default")


def test_arbitrary_units_with_a_background_are_honest(truth, converged_data):
    arbitrary = TDSData.from_hkl(converged_data.hkl, 250 * converged_data.intensity + 40, converged_data.cell,
                                 temperature=T)
    noisy = add_poisson_noise(arbitrary, 4e4, np.random.default_rng(4))
    noise_free, result = _fits(truth, arbitrary, noisy)
    assert result.settings["scale"] == "free"
    _check(noise_free, result, truth, "arbitrary units, scale and background free")


def test_the_model_error_shared_by_all_points_is_in_the_error_bars(truth, converged_data):
    """A crystal of 5³ cells, kept for every point (refine=False), on noise-free intensities with σ = 0.01 %: the
    model's own error is then larger than σ, and being one error shared by all points, it shifts θ by more than
    noise of that σ would. The 1σ must cover θ − θ_true (taken as independent per-point variance, as before
    this test, it left a pull of 5.1), and `model_error` must say that model error makes up most of it."""
    data = dataclasses.replace(converged_data, sigma=1e-4 * converged_data.intensity)
    with pytest.warns(UserWarning, match="own error exceeds a fifth of σ"):
        result = fit(_start(truth), data, background="none", progress=False,
                     tds_options=dict(grid=(5, 5, 5), refine=False))
    pulls = _pulls(result, truth)
    print(f"grid 5³, σ 0.01 %: largest |pull| {np.abs(pulls).max():.2f}, χ²_red {result.chi2_red:.2f}, "
          f"model error's share of the variance {result.model_error['largest_share_of_variance']:.2f}")
    assert np.abs(pulls).max() <= 3, dict(zip(truth.labels, np.round(pulls, 2)))
    assert result.model_error["largest_share_of_variance"] > 0.5
