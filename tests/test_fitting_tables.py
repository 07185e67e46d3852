"""The fit's tables: adding an optimiser or a start is one class or function and one table entry, and then it runs
through `ase_tds.fit` and through `ase-tds fit` (shown with a toy of each, registered for the test only); the
removed checkpoint and fit.json formats are refused by name."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
from ase.io import write

from ase_tds import ForceConstantModel, Optimizer, fit, simulate
from ase_tds.cli import main
from ase_tds.covariance import UnstableError
from ase_tds.fitting import OPTIMIZERS, STARTS
from ase_tds.fitting.optimizers.state import OptimizerState

from conftest import ni_conventional

FIT = dict(method="one-phonon", statistics="classical", background="none", progress=False)
CLI_FIT = ["--shells", 1, "--model", "one-phonon", "--statistics", "classical", "--background", "none"]


@dataclass(kw_only=True)
class ToyState(OptimizerState):
    """The toy's own field beside θ, whitening, iterations and history: its step in whitened units."""

    step: float = 0.5


class ToyGaussNewton:
    """Steps x ← x − step·∂loss/∂x in whitened coordinates x = Rθ: with step ½ the Gauss–Newton step (the loss is
    ≈ |x − x*|² there), halved when the loss rises."""

    label = "toy"
    State = ToyState

    @staticmethod
    def start(theta, whitening, history, settings):
        return ToyState(theta=np.asarray(theta, dtype=float), whitening=whitening, history=list(history))

    @staticmethod
    def run(objective, state, settings, tick, rewhiten=None):
        unwhiten = np.linalg.inv(state.whitening)
        value, grad, _ = objective.evaluate(state.theta)
        while state.iterations < settings.max_iter:
            g = unwhiten.T @ grad
            if np.abs(g).max() < 1e-9:
                return {"converged": True, "reason": "whitened gradient below 1e-9"}
            trial = state.theta - unwhiten @ (state.step * g)
            trial_value, trial_grad, _ = objective.evaluate(trial)
            if trial_value > value:
                state.step /= 2
            else:
                state.theta, value, grad = trial, trial_value, trial_grad
            state.iterations += 1
            state.history.append(value)
            tick(loss=f"{value:.6g}")
        return {"converged": False, "reason": f"iteration limit ({settings.max_iter})"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Noise-free one-phonon intensities of a one-shell Ni model at 200 points (as test_cli's), and its files."""
    folder = tmp_path_factory.mktemp("tables")
    write(folder / "Ni.cif", ni_conventional())
    truth = ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59})
    hkl = np.random.default_rng(3).uniform(-3, 3, size=(200, 3))
    data = simulate(truth, hkl, 300.0, method="one-phonon", statistics="classical")
    data.write(folder / "data.h5")
    return folder, truth, data


@pytest.fixture
def toys(dataset, monkeypatch):
    """The toy optimiser as OPTIMIZERS["toy"], and as STARTS["toy"] a start "toy:F": F (default 0.9) times the
    truth's θ, which says what it did."""
    true = dataset[1].theta.detach().numpy().copy()

    def toy_start(model, argument, context):
        factor = float(argument or 0.9)
        context.tell(f"start: toy, {factor} × the truth")
        return model.set_parameters(factor * true)

    monkeypatch.setitem(OPTIMIZERS, "toy", ToyGaussNewton)
    monkeypatch.setitem(STARTS, "toy", toy_start)


def _in_process(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_registered_optimizer_fits_and_checkpoints_its_own_state(dataset, toys, tmp_path):
    """fit(..., optimizer="toy") runs the toy through the one runner: it reaches the truth, the settings name it, and
    its checkpoint holds the toy's typed state (its own field too) and resumes."""
    _, truth, data = dataset
    true = truth.theta.detach().numpy()
    start = ForceConstantModel(ni_conventional(), shells=1).set_parameters(0.8 * true)
    checkpoint = tmp_path / "toy.ckpt"
    result = fit(start, data, optimizer=Optimizer("toy", max_iter=60), checkpoint=checkpoint, **FIT)
    assert result.settings["optimizer"] == "toy" and result.status["converged"], result.status
    np.testing.assert_allclose(result.theta, true, rtol=1e-6)
    saved = json.loads(checkpoint.read_text())
    assert 0 < saved["step"] <= 0.5 and saved["iterations"] == result.iterations
    resumed = fit(ForceConstantModel(ni_conventional(), shells=1).set_parameters(0.8 * true), data,
                  optimizer=Optimizer("toy", max_iter=60), checkpoint=checkpoint, **FIT)
    assert resumed.iterations == result.iterations
    np.testing.assert_allclose(resumed.theta, result.theta, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"optimizer must be one of \('lbfgs', 'adam', 'toy'\)"):
        Optimizer("other")


def test_a_registered_start_is_used_by_fit(dataset, toys):
    """fit(..., start="toy:0.9") sets θ from the toy start before fitting (no iterations: θ is the start's), and
    from there reaches the truth; a built-in name works the same way ("zero": refused as unstable)."""
    _, truth, data = dataset
    true = truth.theta.detach().numpy()
    model = ForceConstantModel(ni_conventional(), shells=1)
    unmoved = fit(model, data, start="toy:0.9", optimizer=Optimizer(max_iter=0), **FIT)
    np.testing.assert_array_equal(unmoved.theta, 0.9 * true)
    fitted = fit(ForceConstantModel(ni_conventional(), shells=1), data, start="toy", **FIT)
    np.testing.assert_allclose(fitted.theta, true, rtol=1e-6)
    with pytest.raises(UnstableError, match="starting force constants are dynamically unstable"):
        fit(ForceConstantModel(ni_conventional(), shells=1).set_parameters(true), data, start="zero", **FIT)


def test_ase_tds_fit_runs_a_registered_optimizer_and_start(dataset, toys, tmp_path, capsys):
    """`ase-tds fit --optimizer toy --start toy:0.9`: the command passes both names to the API's tables."""
    folder, truth, _ = dataset
    code, out, err = _in_process(capsys, "fit", folder / "Ni.cif", folder / "data.h5", "--out", tmp_path / "out",
                                 *CLI_FIT, "--optimizer", "toy", "--start", "toy:0.9", "--max-iter", 60)
    assert code == 0, err
    assert "start: toy, 0.9 × the truth" in out
    record = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert record["settings"]["optimizer"] == "toy" and record["status"]["converged"]
    np.testing.assert_allclose([p["value"] for p in record["parameters"]], truth.theta.detach().numpy(), rtol=1e-6)
    code, out, err = _in_process(capsys, "fit", folder / "Ni.cif", folder / "data.h5", "--out", tmp_path / "bad",
                                 *CLI_FIT, "--optimizer", "nonsense")
    assert code == 2 and "optimizer must be one of" in err and not (tmp_path / "bad").exists()


def test_old_checkpoint_and_fit_record_formats_are_refused_by_name(tmp_path):
    """A bare-θ checkpoint or one of the older format is refused (not taken as a start), and so is a fit.json
    without every key FitResult.to_dict writes, each naming what to do."""
    from ase_tds.fitting import FitResult
    from ase_tds.fitting.checkpoint import Checkpoint
    from ase_tds.fitting.optimizers import LBFGSState

    path = tmp_path / "fit.ckpt"
    for old in ({"theta": [1.0, 2.0]}, {"format": "ase_tds fit checkpoint 1", "theta": [1.0, 2.0]}):
        path.write_text(json.dumps(old))
        with pytest.raises(ValueError, match="not a fit checkpoint of this version of ase_tds.*delete it"):
            Checkpoint(path, ["1XX", "1XY"], {}).load(LBFGSState)
    with pytest.raises(ValueError, match="lacks status, model_error, combinations"):
        FitResult.from_dict({"parameters": [], "correlation": [], "scale": 1.0, "background": 0.0, "compton": None,
                             "chi2": 1.0, "chi2_red": 1.0, "deviance": None, "n_points": 10, "iterations": 3,
                             "settings": {}, "warnings": []})
