"""The CUDA path equals the CPU path (float64, ≤ 1e-10 relative): forward models, the fit's loss and gradient, a
whole fit, and the ASE calculator. Skipped where torch sees no GPU (CI); run where one is (benchmarks/gpu.py too)."""

import copy
import importlib

import numpy as np
import pytest
import torch

from ase_tds import ForceConstantModel, TDSData, TDSFitted, fit, simulate, tds_model

from conftest import cached_model, ni_conventional

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
TRUTH = {"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59, "2XX": -0.24, "2YY": 0.03}


def _both(model):
    return copy.deepcopy(model), copy.deepcopy(model).to("cuda")


def _close(gpu, cpu, rtol=1e-10):
    gpu = gpu.detach().cpu().numpy() if torch.is_tensor(gpu) else np.asarray(gpu)
    cpu = cpu.detach().cpu().numpy() if torch.is_tensor(cpu) else np.asarray(cpu)
    np.testing.assert_allclose(gpu, cpu, rtol=rtol, atol=rtol * np.abs(cpu).max())


@pytest.mark.parametrize("name", ["Ni", "NaCl", "Mg", "MgB2"])
@pytest.mark.parametrize("method", ["one-phonon", "gaussian"])
def test_forward_models(name, method, rng):
    model = cached_model(name)
    model.set_parameters(np.abs(rng.normal(size=model.n_params)) * 0.1)
    model.set_from_springs(300.0)
    cpu, gpu = _both(model)
    hkl = rng.uniform(-3, 3, size=(500, 3))
    q = cpu.q_from_hkl(hkl)
    options = dict(grid=(6, 6, 6)) if method == "gaussian" else {}
    expected = tds_model(cpu, 300.0, method=method, **options)(torch.as_tensor(q))
    got = tds_model(gpu, 300.0, method=method, **options)(torch.as_tensor(q, device="cuda"))
    _close(got, expected)


def test_loss_gradient_and_fit():
    fit_module = importlib.import_module("ase_tds.fitting.objective")
    truth = ForceConstantModel(ni_conventional(), shells=2).set_from_bvk(TRUTH)
    hkl = np.random.default_rng(0).uniform(-3, 3, size=(400, 3))
    data = simulate(truth, hkl, 300.0, tds_options=dict(grid=(6, 6, 6)))
    start = copy.deepcopy(truth).set_parameters(0.9 * truth.theta.detach().numpy())
    cpu, gpu = _both(start)
    values = [fit_module.Objective(tds_model(m, 300.0, grid=(6, 6, 6)), data, "fixed", "free", "chi2")
              .evaluate(0.9 * truth.theta.detach().numpy()) for m in (cpu, gpu)]
    _close(values[1][1], values[0][1])
    assert values[1][0] == pytest.approx(values[0][0], rel=1e-10)
    results = [fit(m, data, tds_options=dict(grid=(6, 6, 6)), progress=False) for m in (cpu, gpu)]
    _close(results[1].theta, results[0].theta, rtol=1e-8)


def test_calculator_forces(rng):
    model = ForceConstantModel(ni_conventional(), shells=2).set_from_bvk(TRUTH)
    atoms = ni_conventional().repeat(3)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    forces = []
    for device in ("cpu", "cuda"):
        atoms.calc = TDSFitted(copy.deepcopy(model).to(device), reference=ni_conventional().repeat(3))
        forces.append(atoms.get_forces())
    _close(forces[1], forces[0])
