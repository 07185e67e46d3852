"""Tutorial 2 — partial data: fit to one (h k 0) slice in arbitrary units, from a NeXus volume.

A beamline reduction hands you a reciprocal-space volume as a NeXus NXdata group. Here we make one
(synthetic, EMT nickel at 300 K: counts = 350 × I + 40 with Poisson noise, a detector gap), turn it
into the point list of docs/data-format.md, read it back, keep only the (h k 0) plane and fit with a free
intensity scale and background. One plane samples only the phonons with q in that plane; the output
shows what that costs in the parameters' 1σ and correlations.

    python examples/02_slice.py            # full: hk step 0.1 r.l.u. (about 6000 points in the plane)
    python examples/02_slice.py --fast     # step 0.25 (about 1000 points; also ASE_TDS_FAST=1)

Writes into --out (default examples_out/02_slice): beamline.nxs, points.h5, slice.png, dispersion.png.
"""

import argparse
import copy
import os
import time
from pathlib import Path

import h5py
import matplotlib.pyplot as plt
import numpy as np
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from ase_tds import ForceConstantModel, Optimizer, TDSData, fit, simulate, tds_model
from ase_tds.plot import plot_dispersion

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", default=os.environ.get("ASE_TDS_FAST") == "1",
                    help="a coarser hk grid and a coarser model (accuracy 1e-2) (CI)")
parser.add_argument("--out", type=Path, default=Path("examples_out/02_slice"))
args = parser.parse_args()
step, options = (0.25, dict(accuracy=1e-2)) if args.fast else (0.1, {})  # {}: the converged default
args.out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
atoms = bulk("Ni", "fcc", a=3.52, cubic=True)
truth = ForceConstantModel(atoms, shells=5).set_from_calculator(EMT())


def write_beamline_volume(path):
    """A synthetic reduction: NXdata with the signal ordered (L, K, H), counts, errors, NaN in a gap."""
    h = k = np.round(np.arange(-4.5, 4.5 + 1e-9, step), 6)
    l = np.array([-0.1, 0.0, 0.1])
    grid_l, grid_k, grid_h = np.meshgrid(l, k, h, indexing="ij")
    hkl = np.stack([grid_h, grid_k, grid_l], axis=-1).reshape(-1, 3)
    intensity = simulate(truth, hkl, 300.0, tds_options=options).intensity  # e.u./atom, noise-free
    counts = np.random.default_rng(7).poisson(350.0 * intensity + 40.0).astype(float)
    errors = np.sqrt(np.maximum(counts, 1.0))
    gap = np.abs(hkl[:, 0] - 1.3) < 0.2  # a detector gap: never measured
    counts[gap] = errors[gap] = np.nan
    with h5py.File(path, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.create_group("sample").create_dataset("temperature", data=300.0)
        data = entry.create_group("data")
        data.attrs.update(NX_class="NXdata", signal="data", axes=["L", "K", "H"])
        data.create_dataset("data", data=counts.reshape(grid_h.shape))
        data.create_dataset("errors", data=errors.reshape(grid_h.shape))
        for name, values in (("L", l), ("K", k), ("H", h)):
            data.create_dataset(name, data=values)


# --8<-- [start:convert]
def volume_to_point_list(nexus_path, structure, out_path):
    """NXdata volume ordered (L, K, H) → HDF5 point list (docs/data-format.md), one row per measured voxel."""
    with h5py.File(nexus_path, "r") as f:
        group = f["entry/data"]
        counts = group[group.attrs["signal"]][()]  # (nL, nK, nH), NaN where nothing was measured
        errors = group["errors"][()]  # (nL, nK, nH), 1σ of counts
        l, k, h = (group[name][()] for name in group.attrs["axes"])  # axes = ["L", "K", "H"]
        temperature = float(f["entry/sample/temperature"][()])  # K
    grid_l, grid_k, grid_h = np.meshgrid(l, k, h, indexing="ij")  # each (nL, nK, nH), like counts
    hkl = np.stack([grid_h, grid_k, grid_l], axis=-1).reshape(-1, 3)  # columns h, k, l
    counts, errors = counts.reshape(-1), errors.reshape(-1)
    measured = np.isfinite(counts) & np.isfinite(errors) & (errors > 0)
    data = TDSData.from_hkl(hkl[measured], counts[measured], structure, sigma=errors[measured],
                            temperature=temperature, units="counts")  # not "e.u./atom": a scale is fitted
    data.write(out_path)
    return data
# --8<-- [end:convert]


write_beamline_volume(args.out / "beamline.nxs")
volume_to_point_list(args.out / "beamline.nxs", atoms, args.out / "points.h5")
data = TDSData.read(args.out / "points.h5", structure=atoms)  # what `ase-tds fit Ni.cif points.h5` reads
print(f"point list: {len(data)} voxels, units {data.units!r}, {data.temperature:g} K")

# One plane only: h k 0 (|l| ≤ 0.025), |Q| ≤ 8 Å⁻¹, Bragg peaks masked.
plane = data.slice(normal=(0, 0, 1), offset=0.0, thickness=0.05)
plane = plane.mask_window(q_max=8.0).mask_bragg(0.15, truth.primitive.cell[:])
print(f"(h k 0) slice: {len(plane)} points, {plane.n_used} used")

start = copy.deepcopy(truth).set_from_bvk(
    {label: 0.7 * value for label, value in truth.parameter_dict().items() if label.startswith("1")})
model = copy.deepcopy(start)
result = fit(model, plane, scale="free", background="free", optimizer=Optimizer(max_iter=80),
             tds_options=options)
print(f"\nfit: {result.iterations} iterations, χ²_red = {result.chi2_red:.3f}, "
      f"scale = {result.scale:.1f} (true 350), background = {result.background:.1f} (true 40)")
print("warnings:\n  " + "\n  ".join(result.warnings))

true = truth.parameter_dict()
print(f"\n{'label':<7}{'true':>9}{'fitted':>9}{'1σ':>8}{'(fit-true)/σ':>14}")
for label, value, sigma in zip(result.labels, result.theta, result.sigma):
    print(f"{label:<7}{true[label]:>9.4f}{value:>9.4f}{sigma:>8.4f}{(value - true[label]) / sigma:>14.2f}")
# The least determined combination of parameters: the covariance's eigenvector of largest variance.
variance, vectors = np.linalg.eigh(result.covariance)
terms = " ".join(f"{c:+.2f}·{label}" for c, label in zip(vectors[:, -1], result.labels) if abs(c) > 0.05)
print(f"least determined direction (1σ = {np.sqrt(variance[-1]):.3f} eV/Å²): {terms}")
points = {"X": [1, 0, 0], "L": [0.5, 0.5, 0.5], "W": [1, 0.5, 0], "K": [0.75, 0.75, 0]}
q = truth.q_from_hkl(list(points.values()))
print(f"\n{'point':<6}{'true (THz)':>24}{'fitted (THz)':>24}")
for name, f_true, f_fit in zip(points, truth.frequencies(q), model.frequencies(q)):
    print(f"{name:<6}{np.array2string(f_true, precision=3):>24}{np.array2string(f_fit, precision=3):>24}")

# Maps of the plane: data, model and normalised residual (masked points blank).
tds = tds_model(model, 300.0, **options)
with torch.no_grad():
    calculated = result.calculated(tds(plane.q).numpy(), plane.q_norm)  # s·I + b (+ A·c(|Q|) when fitted)
residual = np.where(plane.mask, (plane.intensity - calculated) / plane.sigma, np.nan)
fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), sharey=True)
panels = [("data (counts)", np.where(plane.mask, plane.intensity, np.nan), "viridis", True),
          ("model: scale·I + background", np.where(plane.mask, calculated, np.nan), "viridis", True),
          ("(data − model)/σ", residual, "RdBu_r", False)]
for ax, (title, values, cmap, log) in zip(axes, panels):
    kwargs = dict(norm="log") if log else dict(vmin=-4, vmax=4)
    art = ax.scatter(plane.hkl[:, 0], plane.hkl[:, 1], c=values, s=(25 * step) ** 2, marker="s", cmap=cmap,
                     **kwargs)  # one square marker ≈ one grid step
    fig.colorbar(art, ax=ax)
    ax.set_title(title)
    ax.set_xlabel("h (r.l.u.)")
    ax.set_aspect("equal")
axes[0].set_ylabel("k (r.l.u.)")
fig.tight_layout()
fig.savefig(args.out / "slice.png", dpi=110)
plot_dispersion({"EMT truth": truth, "start": start, "fitted to (h k 0)": model}, args.out / "dispersion.png",
                title="Ni: fitted to one (h k 0) slice, scale and background free")
print(f"\nwrote {args.out}/beamline.nxs, points.h5, slice.png, dispersion.png in {time.time() - t0:.0f} s")
