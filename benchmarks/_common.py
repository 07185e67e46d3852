"""Shared helpers for the benchmark scripts (not a test module): crystals, timing, machine info, output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
T_ROOM = 300.0


def machine() -> dict:
    """What the numbers were measured on: CPU count and the 1-minute load average when the script ran."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_1min": load,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__}


def nickel_model(shells: int = 5):
    """EMT nickel (a = 3.52 Å) on the conventional cell, `shells` neighbour shells, 1-atom primitive."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from ase_tds.model import ForceConstantModel

    atoms = bulk("Ni", "fcc", a=3.52, cubic=True)
    return ForceConstantModel(atoms, shells=shells).set_from_calculator(EMT(), progress=False)


def ni31cu_model(shells: int = 3):
    """Ni31Cu: the 2×2×2 conventional Ni cell (32 atoms) with one atom Cu, EMT; its primitive cell really
    has 32 atoms (simple cubic, Pm-3m), unlike a plain Ni supercell that spglib reduces back to 1 atom."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from ase_tds.model import ForceConstantModel

    atoms = bulk("Ni", "fcc", a=3.52, cubic=True).repeat(2)
    atoms[0].symbol = "Cu"
    model = ForceConstantModel(atoms, shells=shells).set_from_calculator(EMT(), progress=False)
    assert model.n_atoms == 32, model.n_atoms
    return model


def random_q(model, n: int, q_max: float = 8.0, seed: int = 2026) -> np.ndarray:
    """n Cartesian Q (Å⁻¹) uniform in a sphere |Q| ≤ q_max."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, 3))
    q *= (q_max * rng.uniform(0, 1, n) ** (1 / 3) / np.linalg.norm(q, axis=1))[:, None]
    return q


def best_of(func, repeat: int = 3) -> float:
    """Smallest wall time (s) of `repeat` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return min(times)


def earlier_record(name: str) -> dict:
    """The record results/NAME of an earlier run ({} if none): a run of some cases or parts keeps the others'."""
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=float))
    print(f"wrote {path}")
    return path
