"""Tutorial 1 — the nickel benchmark: recover known force constants from synthetic TDS.

The ground truth is fcc nickel with ASE's EMT potential, its force constants projected onto five
neighbour shells (16 parameters). From them we simulate diffuse intensities at random Q with
|Q| ≤ 8 Å⁻¹ (300 K, quantum statistics, all orders, Poisson noise), start a fit from a deliberately
bad model (nearest-neighbour constants only, 30 % too soft) and check that the fit recovers the
truth: parameters, frequencies at the zone-boundary points, and the dispersion. A second fit to the
same data with the intensity scale free shows what absolute intensities are worth.

    python examples/01_nickel_benchmark.py            # full: 1500 points, about 30 s
    python examples/01_nickel_benchmark.py --fast     # 400 points, about 10 s (also ASE_TDS_FAST=1)

Writes into --out (default examples_out/01_nickel_benchmark): dispersion.png, tds_fit.png and, in
fitted/, the phonopy files and fit.json that tutorial 3 uses.
"""

import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from ase_tds import ForceConstantModel, Optimizer, fit, simulate, tds_model
from ase_tds.io.phonopy import write_phonopy_files
from ase_tds.plot import plot_dispersion, plot_tds_fit

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", default=os.environ.get("ASE_TDS_FAST") == "1",
                    help="fewer points and a coarser model (accuracy 1e-2) (CI)")
parser.add_argument("--out", type=Path, default=Path("examples_out/01_nickel_benchmark"))
args = parser.parse_args()
n_points, options = (400, dict(accuracy=1e-2)) if args.fast else (1500, {})  # {}: the converged default
args.out.mkdir(parents=True, exist_ok=True)
t0 = time.time()

# 1. Ground truth: EMT force constants (phonopy finite displacements), projected on the 5-shell basis.
atoms = bulk("Ni", "fcc", a=3.52, cubic=True)  # conventional cell: the data's hkl index this cell
truth = ForceConstantModel(atoms, shells=5).set_from_calculator(EMT())
print(truth)

# 2. Synthetic data: random hkl with |Q| ≤ 8 Å⁻¹, intensities in e.u./atom with Poisson noise
#    (the mean intensity counted as 1.1e5 counts), Bragg peaks masked (0.1 r.l.u.).
rng = np.random.default_rng(2026)
box = 8.0 * 3.52 / (2 * np.pi)  # the largest |h| with |Q| ≤ 8 Å⁻¹
hkl = rng.uniform(-box, box, size=(4 * n_points, 3))
hkl = hkl[np.linalg.norm(truth.q_from_hkl(hkl), axis=1) <= 8.0][:n_points]
data = simulate(truth, hkl, temperature=300.0, method="gaussian", statistics="quantum",
                counts=1.1e5, rng=rng, tds_options=options)
data = data.mask_bragg(0.1, truth.primitive.cell[:])
print(f"{len(data)} points, {data.n_used} used after masking Bragg peaks, {data.units}, {data.temperature:g} K")

# 3. A bad start: nearest-neighbour constants only, scaled by 0.7; the other shells zero.
start = copy.deepcopy(truth).set_from_bvk(
    {label: 0.7 * value for label, value in truth.parameter_dict().items() if label.startswith("1")})

# 4. The fit: absolute data, so the intensity scale is fixed to 1; a constant background is free.
model = copy.deepcopy(start)
result = fit(model, data, method="gaussian", statistics="quantum", scale="fixed",
             optimizer=Optimizer(max_iter=60), tds_options=options)
print(f"\nfit: {result.iterations} L-BFGS iterations, χ²_red = {result.chi2_red:.3f} on {result.n_points} points")

# 5. Recovery: parameters (eV/Å²) with their 1σ, and frequencies (THz) at X, L, W, K.
true, first = truth.parameter_dict(), start.parameter_dict()
print(f"\n{'label':<7}{'true':>9}{'start':>9}{'fitted':>9}{'1σ':>8}{'(fit-true)/σ':>14}")
for label, value, sigma in zip(result.labels, result.theta, result.sigma):
    print(f"{label:<7}{true[label]:>9.4f}{first[label]:>9.4f}{value:>9.4f}{sigma:>8.4f}"
          f"{(value - true[label]) / sigma:>14.2f}")
points = {"X": [1, 0, 0], "L": [0.5, 0.5, 0.5], "W": [1, 0.5, 0], "K": [0.75, 0.75, 0]}
q = truth.q_from_hkl(list(points.values()))
print(f"\n{'point':<6}{'true (THz)':>24}{'start (THz)':>24}{'fitted (THz)':>24}")
for name, f_true, f_start, f_fit in zip(points, truth.frequencies(q), start.frequencies(q), model.frequencies(q)):
    print(f"{name:<6}" + "".join(f"{np.array2string(f, precision=3):>24}" for f in (f_true, f_start, f_fit)))

# 6. The same data as if in arbitrary units: the intensity scale free. Its degeneracy with the overall
#    magnitude of θ is broken only by the Debye–Waller and multi-phonon terms (and quantum statistics),
#    so the 1σ of the large (nearest-neighbour) constants grow (Theory: what a fit can determine).
free = copy.deepcopy(start)
free_result = fit(free, data, method="gaussian", statistics="quantum", scale="free",
                  optimizer=Optimizer(max_iter=60), tds_options=options)
print(f"\nscale free: fitted scale {free_result.scale:.4f} (true 1), χ²_red = {free_result.chi2_red:.3f}")
print(f"{'label':<7}{'true':>9}{'fitted':>9}{'1σ':>8}{'1σ / 1σ(scale fixed)':>23}")
for label, value, sigma, fixed_sigma in zip(free_result.labels, free_result.theta, free_result.sigma, result.sigma):
    print(f"{label:<7}{true[label]:>9.4f}{value:>9.4f}{sigma:>8.4f}{sigma / fixed_sigma:>23.1f}")

# 7. Plots and files: the dispersion of truth, start and fit; data vs model; phonopy files + fit.json.
plot_dispersion({"EMT truth": truth, "start": start, "fitted": model}, args.out / "dispersion.png",
                title="Ni: fitted to synthetic TDS")
used = data.mask
tds = tds_model(model, 300.0, method="gaussian", statistics="quantum", **options)
with torch.no_grad():
    calculated = result.calculated(tds(data.q[used]).numpy(), data.q_norm[used])  # s·I + b (+ A·c(|Q|) when fitted)
plot_tds_fit(data.q_norm[used], data.intensity[used], calculated, data.sigma[used], args.out / "tds_fit.png")
write_phonopy_files(model, args.out / "fitted")
result.write_json(args.out / "fitted" / "fit.json")
print(f"\nwrote {args.out}/dispersion.png, tds_fit.png and fitted/ in {time.time() - t0:.0f} s")
