"""CPU against GPU in one run (issue 12): the prepared script for a lent device machine; it runs on CPU alone too.

Each figure is the best of 3 wall times (after a warm-up, CUDA synchronised), float64, on the CPU and on `cuda`:

- one-phonon, 10⁶ Q (quantum, Debye–Waller on): Ni (1 atom, 5 shells) and Ni31Cu (32-atom primitive cell; 10⁴ Q),
  both at the converged default (Debye–Waller meshes 12³ + 24³);
- gaussian (all orders) at the converged default, Ni, 10⁵ Q;
- QSpaceSampler, quantum, one sample of 10⁶ atoms (63³ conventional Ni cells);
- the fit's profiled χ² and its gradient at 10⁶ points (Ni, chunks of CHUNK_POINTS);
- the same on a volume of 10⁶ voxels by the FFT route (Ni, hkl from 0.5 in steps of 0.02 r.l.u.: the model "fft" on
  its 100³ crystal; `--quick`: 46³ voxels in steps of 0.05, a 40³ crystal);

and the largest relative difference of the GPU results from the CPU ones (the CUDA = CPU check of
tests/test_cuda.py, at full size; not for the sampler, whose random streams differ between devices). Without CUDA only the CPU column is filled. `--quick`: 10× fewer points.

    python benchmarks/gpu.py [--quick]          # → results/gpu.json (gpu_quick.json)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import T_ROOM, ni31cu_model, nickel_model, random_q, write_json  # noqa: E402


def timed(func, device: str, repeat: int = 3):
    """(best wall time s, last result) of func() on `device`, synchronised."""
    result = func()  # warm-up: caches, kernels
    best = np.inf
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = func()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, result


def cases(n: int):
    """name → (builder(device) → callable returning a tensor or array)."""
    from ase_tds import TDSData, tds_model
    from ase_tds.sampling import QSpaceSampler

    fit_module = importlib.import_module("ase_tds.fitting.objective")
    ni, ni31cu = nickel_model(), ni31cu_model()

    def one_phonon(model, points, **options):
        q = random_q(model, points)

        def build(device):
            tds = tds_model(copy.deepcopy(model).to(device), T_ROOM, method="one-phonon", **options)
            q_t = torch.as_tensor(q, device=device)
            return lambda: tds(q_t).detach()
        return build

    def gaussian(device):
        q = torch.as_tensor(random_q(ni, n // 10), device=device)
        tds = tds_model(copy.deepcopy(ni).to(device), T_ROOM, q_max=8.0)
        return lambda: tds(q).detach()

    def sampler(device):
        model = copy.deepcopy(ni).to(device)  # conventional cell, 4 atoms: 63³ cells ≈ 10⁶ atoms
        side = max(4, round((n / 4) ** (1 / 3)))
        draw = QSpaceSampler(model, (side, side, side), T_ROOM, "quantum", progress=False)
        generator = torch.Generator(device=device)
        return lambda: (generator.manual_seed(0), draw.sample(1, generator))[1]

    def loss_gradient(device):
        model = copy.deepcopy(ni).to(device)
        hkl = np.random.default_rng(0).uniform(-4, 4, size=(n, 3))
        data = TDSData.from_hkl(hkl, np.ones(n), model.unitcell.cell[:], sigma=np.full(n, 0.01), temperature=T_ROOM,
                                units="e.u./atom")
        objective = fit_module.Objective(tds_model(model, T_ROOM, q_max=8.0 * 1.2), data, "fixed", "free", "chi2")
        theta = ni.theta.detach().numpy()
        return lambda: objective.evaluate(theta)[1]

    side = round(n ** (1 / 3))
    return {f"one-phonon Ni, {n} Q": one_phonon(ni, n), f"one-phonon Ni31Cu, {n // 100} Q": one_phonon(ni31cu, n // 100),
            f"gaussian Ni, {n // 10} Q": gaussian, f"QSpaceSampler quantum, {n} atoms": sampler,
            f"loss + gradient Ni, {n} points": loss_gradient,
            f"loss + gradient Ni volume, fft route, {side}³ voxels": fft_volume(ni, side)}


def fft_volume(model, side: int):
    """builder(device) → the loss + gradient of a Ni volume of side³ voxels by the FFT route (the model "fft")."""
    from ase_tds import TDSData, tds_model

    fit_module = importlib.import_module("ase_tds.fitting.objective")
    step = 0.02 if side >= 100 else 0.05  # the voxels' own crystal: 100³ and 40³ primitive cells
    axis = 0.5 + step * np.arange(side)
    hkl = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    data = TDSData.from_hkl(hkl, np.ones(len(hkl)), model.unitcell.cell[:], sigma=np.full(len(hkl), 0.01),
                            temperature=T_ROOM, units="e.u./atom").mask_bragg(0.1, model.primitive.cell[:])
    q = data.q[data.mask]

    def build(device):
        on_device = copy.deepcopy(model).to(device)
        tds = tds_model(on_device, T_ROOM, q_max=float(np.linalg.norm(q, axis=1).max()), voxels=q)
        assert tds.name == "fft", "the volume's voxels must take the FFT route"
        objective = fit_module.Objective(tds, data, "fixed", "free", "chi2")
        theta = model.theta.detach().numpy()
        return lambda: objective.evaluate(theta)[1]
    return build


def as_array(value) -> np.ndarray:
    return (value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)).astype(complex).ravel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10× fewer points")
    args = parser.parse_args()
    n = 10**5 if args.quick else 10**6
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"devices: {devices}" + ("" if len(devices) > 1 else " (no CUDA: CPU figures only)"), flush=True)
    records = {}
    for name, build in cases(n).items():
        record, results = {}, {}
        for device in devices:
            record[f"{device}_s"], results[device] = timed(build(device), device)
        if "cuda" in results:
            record["gpu_speedup"] = record["cpu_s"] / record["cuda_s"]
            if not name.startswith("QSpaceSampler"):  # its random numbers differ between devices
                cpu, gpu = as_array(results["cpu"]), as_array(results["cuda"])
                record["max_relative_difference"] = float(np.abs(gpu - cpu).max() / np.abs(cpu).max())
        records[name] = record
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()), flush=True)
    device_name = torch.cuda.get_device_name(0) if "cuda" in devices else None
    write_json("gpu_quick.json" if args.quick else "gpu.json", {"gpu": device_name, "cases": records})


if __name__ == "__main__":
    main()
