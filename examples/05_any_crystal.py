"""Tutorial 5 — any crystal: NaCl from DFT force constants, fitted from springs, and what one plane cannot tell.

No EMT for Na and Cl: the start is `set_from_springs` (central springs within the cutoff, scaled to a Debye
temperature; stable by construction), the generic start for a crystal nothing else covers. The truth is phonopy's
own DFT force constants of NaCl (its example set, in tests/data/dft), projected on a 5 Å cutoff (10 parameters).
Two fits to simulated 300 K data with 0.3 % Poisson noise: points spread over reciprocal space, then one (h 0 l)
plane — a mirror plane, where the fit names the combinations of force constants it cannot determine.

    python examples/05_any_crystal.py            # full: 3000 points per fit, the converged default model
    python examples/05_any_crystal.py --fast     # 300 points, a coarse 4×4×4 model (CI; also ASE_TDS_FAST=1)

Writes into --out (default examples_out/05_any_crystal): dispersion.png (with the fit's ±1σ band),
dispersion_slice.png, identifiability_slice.png.
"""

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
import phonopy
from ase import Atoms

from ase_tds import ForceConstantModel, fit, simulate
from ase_tds.data import add_poisson_noise
from ase_tds.plot import dispersion_path, plot_dispersion, plot_identifiability

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", default=os.environ.get("ASE_TDS_FAST") == "1",
                    help="fewer points and a coarse model (grid 4×4×4) (CI)")
parser.add_argument("--out", type=Path, default=Path("examples_out/05_any_crystal"))
args = parser.parse_args()
n_points, options = (300, dict(grid=(4, 4, 4), refine=False)) if args.fast else (3000, {})  # {}: the converged default
args.out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
rng = np.random.default_rng(5)

# the truth: DFT force constants (phonopy's example), on the conventional cubic cell as phonopy gives it
dft = phonopy.load(Path(__file__).resolve().parents[1] / "tests/data/dft/NaCl/phonopy_params.yaml",
                   produce_fc=False, is_nac=False, log_level=0)
cell = dft.unitcell
structure = Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)
truth = ForceConstantModel(structure, cutoff=5.0).set_from_phonopy(dft)
print(f"NaCl, {truth.n_params} parameters within {truth.cutoff} Å: {', '.join(truth.labels)}")


def measure(hkl):
    """Simulated data at hkl (conventional r.l.u.), 300 K, e.u./atom, 0.3 % Poisson noise."""
    data = simulate(truth, hkl, 300.0, tds_options=options)
    return add_poisson_noise(data, 1.1e5, rng).mask_bragg(0.1, truth.primitive.cell[:])


def ball(n, q_max=7.0):
    hkl = rng.uniform(-7, 7, size=(8 * n, 3))
    return hkl[np.linalg.norm(truth.q_from_hkl(hkl), axis=1) <= q_max][:n]


def frequency_error(model):
    q = dispersion_path(truth)[0]
    error = model.frequencies(q) - truth.frequencies(q)
    return np.sqrt(np.mean(error**2)), np.abs(error).max()


# 1 · points spread over reciprocal space, from springs
start = ForceConstantModel(structure, cutoff=5.0).set_from_springs(debye_temperature=300.0)
print(f"start (springs, Debye temperature 300 K): frequencies {frequency_error(start)[0]:.2f} THz RMS from the truth")
model = ForceConstantModel(structure, cutoff=5.0).set_parameters(start.theta.detach().numpy())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    result = fit(model, measure(ball(n_points)), tds_options=options, progress=False)
print(result.table())
rms, worst = frequency_error(model)
pulls = (result.theta - truth.theta.detach().numpy()) / result.sigma
print(f"band path: {rms:.4f} THz RMS, {worst:.4f} THz worst from the truth; largest |pull| {np.abs(pulls).max():.2f}")
plot_dispersion({"fitted": model, "truth (DFT, 5 Å)": truth, "start (springs)": start}, args.out / "dispersion.png",
                title="NaCl from springs", covariance=result.covariance)

# 2 · one (h 0 l) plane: a mirror plane of the cubic crystal
hkl = rng.uniform(-7, 7, size=(8 * n_points, 3))
hkl[:, 1] = 0.0
hkl = hkl[np.linalg.norm(truth.q_from_hkl(hkl), axis=1) <= 7.0][:n_points]
model = ForceConstantModel(structure, cutoff=5.0).set_parameters(start.theta.detach().numpy())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    result = fit(model, measure(hkl), tds_options=options, progress=False)
print(f"\n(h 0 l) plane: χ²_red {result.chi2_red:.3f}; the 1σ of each combination of force constants, least "
      "determined first:")
for combo in result.combinations:
    note = "" if combo["determined"] else "   <- undetermined"
    print(f"  {combo['sigma']:9.3g} eV/Å²  {combo['text']}{note}")
pulls = (result.theta - truth.theta.detach().numpy()) / result.sigma
rms, worst = frequency_error(model)
print(f"band path {rms:.3f} THz RMS, {worst:.3f} THz worst from the truth; largest |pull| {np.abs(pulls).max():.2f}")
plot_identifiability(result.combinations, args.out / "identifiability_slice.png", title="NaCl, one (h 0 l) plane")
plot_dispersion({"fitted to (h 0 l)": model, "truth": truth}, args.out / "dispersion_slice.png",
                title="NaCl from one (h 0 l) plane", covariance=result.covariance)
print(f"\n{time.time() - t0:.0f} s; figures in {args.out}")
