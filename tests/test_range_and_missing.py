"""A range chosen by the data (`fitting.range`) and a misfit that names its missing physics (`fitting.missing`).

Data from models outside the fitted one: a 3-shell truth fitted from one shell up; a polar truth (Born charges)
fitted without them, and with them at too short a cutoff.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from ase.build import bulk

from ase_tds import ForceConstantModel, fit, simulate
from ase_tds.dipole import BornCharges
from ase_tds.fitting.range import fit_range

from conftest import ni_conventional

FAST = dict(method="one-phonon", statistics="classical", background="none", progress=False,
            tds_options=dict(dw_mesh=3))


def _points(model, n, seed=0):
    hkl = np.random.default_rng(seed).uniform(-3, 3, size=(4 * n, 3))
    far = np.linalg.norm(hkl - np.round(hkl), axis=1) > 0.15
    return hkl[far][:n]


def test_the_range_the_data_choose(rng):
    """Nickel whose force constants reach the 3rd shell: the held-out score falls to 3 shells and not beyond it
    (noise only), every candidate is recorded, and the fit of the chosen range recovers the truth."""
    truth = ForceConstantModel(ni_conventional(), shells=3).set_from_bvk(
        {"1XX": 1.5, "1ZZ": -0.06, "1XY": 1.6, "2XX": 0.1, "2YY": -0.03, "3XX": 0.05, "3YY": 0.02, "3YZ": 0.01,
         "3XZ": 0.02})
    data = simulate(truth, _points(truth, 500), 300.0, method="one-phonon", statistics="classical", counts=1e6,
                    rng=1, tds_options=dict(dw_mesh=3))
    model, result = fit_range(ni_conventional(), data, start="springs", max_shells=6, **FAST)
    record = result.settings["range"]
    assert [c["shells"] for c in record["candidates"]][:3] == [1, 2, 3]
    assert record["chosen"]["shells"] == 3 and model.n_params == truth.n_params
    scores = [c["score"] for c in record["candidates"]]
    assert scores[2] < scores[1] < scores[0]  # each needed shell lowers the held-out score
    assert result.trusted and np.all(np.abs(result.theta - truth.theta.detach().numpy()) < 4 * result.sigma)


def test_a_range_that_ends_at_its_limit_says_the_constants_may_reach_further(rng):
    """The same 3-shell nickel allowed 2 shells: the best candidate is the last, so the range may reach further
    and the fit says so rather than reporting 1σ that leave the truncation out."""
    truth = ForceConstantModel(ni_conventional(), shells=3).set_from_bvk(
        {"1XX": 1.5, "1ZZ": -0.06, "1XY": 1.6, "2XX": 0.1, "2YY": -0.03, "3XX": 0.05, "3YY": 0.02, "3YZ": 0.01,
         "3XZ": 0.02})
    data = simulate(truth, _points(truth, 300), 300.0, method="one-phonon", statistics="classical", counts=1e6,
                    rng=1, tds_options=dict(dw_mesh=3))
    with pytest.warns(UserWarning, match="range ends at the largest asked for"):
        _, result = fit_range(ni_conventional(), data, start="springs", max_shells=2, explain_misfit=False, **FAST)
    assert result.settings["range"]["at_limit"] and any("reach further" in w for w in result.warnings)


@pytest.fixture(scope="module")
def polar_truth():
    """Rocksalt NaCl, 2 shells of springs with Born charges ±1.1 e, ε∞ 2.4, and one-phonon data from it."""
    model = ForceConstantModel(bulk("NaCl", "rocksalt", a=5.64), shells=2).set_from_springs(300.0)
    sign = 1 if model.primitive.get_chemical_symbols()[0] == "Na" else -1
    model.set_born(BornCharges(sign * np.array([np.eye(3) * 1.1, -np.eye(3) * 1.1]), 2.4 * np.eye(3)))
    data = simulate(model, _points(model, 400, seed=3), 300.0, method="one-phonon", statistics="classical",
                    counts=1e6, rng=2, tds_options=dict(dw_mesh=3))
    return model, data


def test_without_the_born_charges_the_fit_names_dipole_forces(polar_truth):
    truth, data = polar_truth
    model = ForceConstantModel(truth.unitcell, shells=2)
    with pytest.warns(UserWarning, match="most likely comes from missing dipole"):
        result = fit(model, data, start="springs", **FAST)
    assert not result.trusted and result.missing_physics["likely"] == "dipole"
    assert "--born" in result.missing_physics["cure"] and "NOT TRUSTED" in result.table()


def test_at_too_short_a_range_the_fit_names_the_range(polar_truth):
    truth, data = polar_truth
    model = ForceConstantModel(truth.unitcell, shells=1).set_born(copy.deepcopy(truth.born))
    with pytest.warns(UserWarning, match="most likely comes from missing range"):
        result = fit(model, data, start="springs", **FAST)
    assert not result.trusted and result.missing_physics["likely"] == "range"


def test_a_floppy_first_start_grows_to_a_stable_one():
    """Diamond's nearest-neighbour central springs leave it floppy: the range starts at the first stable model (two
    shells) and says why, rather than failing on the start."""
    si = bulk("Si", "diamond", a=5.43)
    truth = ForceConstantModel(si, shells=2).set_from_springs(600.0)
    data = simulate(truth, _points(truth, 200, seed=4), 300.0, method="one-phonon", statistics="classical",
                    counts=1e6, rng=3, tds_options=dict(dw_mesh=3))
    with pytest.raises(ValueError, match="unstable at every Debye temperature"):
        fit(ForceConstantModel(si, shells=1), data, start="springs", **FAST)
    model, result = fit_range(si, data, start="springs", max_shells=3, **FAST)
    assert result.settings["range"]["candidates"][0]["shells"] == 2
    assert result.settings["range"]["chosen"]["shells"] >= 2 and result.trusted


def test_a_candidate_unstable_from_the_last_one_starts_afresh(monkeypatch):
    """Where the last candidate's constants are unstable at the next range (stable only where they were fitted), that
    candidate starts from the start again rather than ending the choice."""
    import ase_tds.fitting.range as range_module

    si = bulk("Si", "diamond", a=5.43)
    truth = ForceConstantModel(si, shells=3).set_from_springs(600.0)
    data = simulate(truth, _points(truth, 200, seed=4), 300.0, method="one-phonon", statistics="classical",
                    counts=1e6, rng=3, tds_options=dict(dw_mesh=3))

    def unstable(previous, shells):
        model = ForceConstantModel(previous.unitcell, shells=shells).set_from_springs(600.0)
        return model.set_parameters(-model.theta.detach().numpy())

    monkeypatch.setattr(range_module, "_grown", unstable)
    model, result = fit_range(si, data, start="springs", max_shells=3, **FAST)
    candidates = result.settings["range"]["candidates"]
    assert [(c["shells"], c["restarted"]) for c in candidates] == [(2, False), (3, True)]
    assert result.settings["range"]["chosen"]["shells"] == 3 and result.trusted
