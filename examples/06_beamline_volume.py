"""Tutorial 6 — from a beamline's volume to force constants: an NXRefine file, its Bragg peaks, and maps of the fit.

NXRefine (CHESS QM2, APS 6-ID-D) writes reciprocal-space volumes as entry/masked_transform: the summed signal `data`
on axes Ql, Qk, Qh (native order (nl, nk, nh)) and `weights`, the number of contributions per voxel. Here we write one
(synthetic: EMT nickel at 300 K, one-phonon, Poisson counts, a detector gap and the Bragg peaks left in), read it as
`ase-tds fit` does, mask the allowed reflections of the structure, fit, and draw data, model and (data − model)/σ in
the planes (h k 0) and (h k 0.5) with `ase-tds plot FITDIR --plane "h k 0" --plane "h k 0.5"`.

    python examples/06_beamline_volume.py           # full: hk step 0.05 r.l.u. (about 10 000 voxels)
    python examples/06_beamline_volume.py --fast    # step 0.1 (also ASE_TDS_FAST=1)

Writes into --out (default examples_out/06_beamline_volume): ni_300K.nxs, fit/, and the plots of `ase-tds plot`
(tds_plane_h_k_0.png, tds_plane_h_k_0.5.png, tds_fit.png, dispersion.png, identifiability.png).
"""

import argparse
import copy
import os
import time
import warnings
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from nexusformat.nexus import NXdata, NXentry, NXfield, NXroot, NXsample

from ase_tds import ForceConstantModel, Optimizer, TDSData, fit, simulate
from ase_tds.cli import main

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", default=os.environ.get("ASE_TDS_FAST") == "1",
                    help="a coarser hk grid (CI)")
parser.add_argument("--out", type=Path, default=Path("examples_out/06_beamline_volume"))
args = parser.parse_args()
step = 0.1 if args.fast else 0.05
args.out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
atoms = bulk("Ni", "fcc", a=3.52, cubic=True)
truth = ForceConstantModel(atoms, shells=2).set_from_calculator(EMT())
MODEL = dict(method="one-phonon", statistics="classical")


# --8<-- [start:write]
def write_nxrefine(path):
    """NXRefine's layout: entry/masked_transform = NXdata(data, [Ql, Qk, Qh]) with weights; entry/sample."""
    qh = qk = np.round(np.arange(-2.5, 2.5 + 1e-9, step), 6)
    ql = np.array([0.0, 0.5])
    grid_l, grid_k, grid_h = np.meshgrid(ql, qk, qh, indexing="ij")  # (nl, nk, nh)
    hkl = np.stack([grid_h, grid_k, grid_l], axis=-1).reshape(-1, 3)
    rng = np.random.default_rng(7)
    weights = rng.integers(1, 5, len(hkl)).astype(float)  # contributions (pixel-frames) per voxel
    weights[np.abs(hkl[:, 0] - 1.3) < 0.15] = 0  # a detector gap: never measured
    parity = np.round(hkl) % 2
    bragg = (np.abs(hkl - np.round(hkl)).max(axis=1) < 1e-9) & ((parity == 0).all(axis=1) | (parity == 1).all(axis=1))
    intensity = np.full(len(hkl), 1e7)  # allowed reflections (fcc: h, k, l all even or all odd): Bragg peaks
    intensity[~bragg] = simulate(truth, hkl[~bragg], 300.0, **MODEL).intensity  # the diffuse scattering, e.u./atom
    counts = rng.poisson(300.0 * intensity * weights).astype(float)  # summed over the contributions
    root = NXroot(NXentry())
    root.entry.sample = NXsample(temperature=NXfield(300.0, units="K"), unitcell_a=3.52, unitcell_b=3.52,
                                 unitcell_c=3.52, unitcell_alpha=90.0, unitcell_beta=90.0, unitcell_gamma=90.0)
    axes = [NXfield(ql, name="Ql"), NXfield(qk, name="Qk"), NXfield(qh, name="Qh")]
    root.entry.masked_transform = NXdata(NXfield(counts.reshape(grid_h.shape), name="data"), axes)
    root.entry.masked_transform["weights"] = NXfield(weights.reshape(grid_h.shape))
    root.save(str(path), "w")
# --8<-- [end:write]


write_nxrefine(args.out / "ni_300K.nxs")
# --8<-- [start:read]
data = TDSData.read(args.out / "ni_300K.nxs", structure=atoms)  # the reader table picks NXRefine's layout
print(f"read {len(data)} measured voxels at {data.temperature:g} K, cell a = {data.cell[0, 0]:.3f} Å")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    data.mask_bragg(0, structure=atoms)  # nothing masked: the peaks are named
print("without a mask:", caught[0].message)
data = data.mask_bragg(0.15, structure=atoms)  # as `ase-tds fit ... --mask-bragg 0.15`
print(f"masked within 0.15 r.l.u. of the allowed reflections: {data.n_used} of {len(data)} voxels used")
# --8<-- [end:read]

model = copy.deepcopy(truth).set_parameters(0.8 * truth.theta.detach().numpy())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the free scale's notes; the table below says what was fitted
    result = fit(model, data, optimizer=Optimizer(max_iter=100), progress=False, **MODEL)
print(result.table())
error = np.abs(result.theta - truth.theta.detach().numpy()) / result.sigma
print(f"largest |fitted − true| / 1σ: {error.max():.2f}")
result.save(args.out / "fit", model, data, reference=truth)
# --8<-- [start:plot]
main(["plot", str(args.out / "fit"), "--plane", "h k 0", "--plane", "h k 0.5", "--out", str(args.out)])
# --8<-- [end:plot]
print(f"done in {time.time() - t0:.0f} s")
