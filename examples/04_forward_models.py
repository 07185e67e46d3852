"""Tutorial 4 — the three forward models side by side, and what separates them.

EMT nickel (five shells) at 300 K. Along the line (h, 1/2, 0) of the cubic cell, h from 1 to 6:
one-phonon classical and quantum, the all-order gaussian model, and the sampling model (QSpaceSampler
on a supercell of 12³ primitive cells, quantum, with its Monte-Carlo standard error) against the
gaussian model of that same supercell. Then, over
random Q in shells of |Q|, the multi-phonon share of the intensity and the quantum/classical ratio;
the mean-square displacement classical vs quantum; and the sampling model refusing a Q that its
periodic supercell does not support.

    python examples/04_forward_models.py            # full: 64 samples, 400 random Q per shell
    python examples/04_forward_models.py --fast     # 16 samples, 100 Q per shell (also ASE_TDS_FAST=1)

Writes --out (default examples_out/04_forward_models)/forward_models.png.
"""

import argparse
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from ase_tds import ForceConstantModel, tds_model
from ase_tds.sampling import QSpaceSampler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", default=os.environ.get("ASE_TDS_FAST") == "1",
                    help="fewer samples and Q points (CI)")
parser.add_argument("--out", type=Path, default=Path("examples_out/04_forward_models"))
args = parser.parse_args()
n_samples, n_random = (16, 100) if args.fast else (64, 400)
args.out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
T = 300.0

conventional = bulk("Ni", "fcc", a=3.52, cubic=True)  # hkl below are in its r.l.u.
model = ForceConstantModel(bulk("Ni", "fcc", a=3.52), shells=5).set_from_calculator(EMT())  # primitive cell
models = {
    "one-phonon, classical": tds_model(model, T, method="one-phonon", statistics="classical"),
    "one-phonon, quantum": tds_model(model, T, method="one-phonon", statistics="quantum"),
    "gaussian (all orders), quantum": tds_model(model, T, method="gaussian", statistics="quantum"),
}
# The sampling model describes one periodic supercell: 12×12×12 primitive cells, 1728 atoms. Its exact
# counterpart is the gaussian model of that periodic crystal alone (refine=False: no larger crystals near Bragg).
L = 12
sampler = QSpaceSampler(model, (L, L, L), T, statistics="quantum", n_samples=n_samples, seed=1)
sampling = tds_model(model, T, method="sampling", statistics="quantum", sampler=sampler)
same_supercell = tds_model(model, T, method="gaussian", statistics="quantum", grid=(L, L, L), refine=False)

# 1. Along (h, 1/2, 0) of the cubic cell, h in steps of 1/6 (on the supercell's reciprocal lattice).
h = np.arange(6, 37) / 6
q = model.q_from_hkl(np.stack([h, np.full_like(h, 0.5), np.zeros_like(h)], axis=1), cell=conventional.cell)
with torch.no_grad():
    line = {name: tds(q).numpy() for name, tds in models.items()}
    mean, stderr = (x.numpy() for x in sampling.intensity(q))
    exact = same_supercell(q).numpy()
names = ("gaussian (all orders), quantum", "one-phonon, quantum", "one-phonon, classical")
gauss, one_q, one_c = (line[name] for name in names)
pull = (mean - exact) / stderr
print(f"{sampler}, {n_samples} samples, on {len(q)} Q of (h, 1/2, 0):")
print(f"  (sampling − gaussian on the same supercell)/stderr: mean {pull.mean():+.2f}, "
      f"rms {np.sqrt((pull**2).mean()):.2f}")
print(f"  the {L}³ supercell vs the converged gaussian model: intensity ratio "
      f"{(exact / gauss).min():.3f}–{(exact / gauss).max():.3f}")

# 2. Over random Q in shells of |Q|: multi-phonon share and the quantum/classical ratio.
rng = np.random.default_rng(0)
print(f"\n{'|Q| (Å⁻¹)':<12}{'multi-phonon share':>20}{'I₁ quantum / classical':>25}")
for q_mid in (2.0, 4.0, 6.0, 7.0, 8.0):
    direction = rng.normal(size=(n_random, 3))
    radius = rng.uniform(q_mid - 0.25, q_mid + 0.25, (n_random, 1))
    q_shell = direction / np.linalg.norm(direction, axis=1, keepdims=True) * radius
    with torch.no_grad():
        i_all, i_q, i_c = (models[name](q_shell).numpy() for name in names)
    share = 1 - i_q / i_all
    print(f"{q_mid:<12.1f}{np.median(share):>11.3f} [{np.percentile(share, 10):.3f}–{np.percentile(share, 90):.3f}]"
          f"{np.median(i_q / i_c):>16.3f} [{np.percentile(i_q / i_c, 10):.3f}–{np.percentile(i_q / i_c, 90):.3f}]")
print("(median [10th–90th percentile] over random Q in |Q| ± 0.25 Å⁻¹)")

# 3. Mean-square displacement per Cartesian direction, the Debye–Waller input.
with torch.no_grad():
    msd = {s: tds_model(model, T, method="one-phonon", statistics=s).mean_square_displacement()[0, 0, 0].item()
           for s in ("classical", "quantum")}
    msd["supercell"] = sampler.mean_square_displacement()[0, 0, 0].item()
print(f"\n⟨u_x²⟩ at {T:g} K: classical {msd['classical']:.5f} Å², quantum {msd['quantum']:.5f} Å² "
      f"(ratio {msd['quantum'] / msd['classical']:.3f}; converged Brillouin-zone averages); "
      f"the {L}³ supercell's own, quantum: {msd['supercell']:.5f} Å²")

# 4. A finite periodic supercell supports only Q on its own reciprocal lattice.
try:
    sampling.intensity(model.q_from_hkl([[2.05, 0.5, 0.0]], cell=conventional.cell))
except ValueError as err:
    print(f"\nsampling at hkl (2.05, 0.5, 0) refused: {err}")

fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, height_ratios=[2, 1])
for (name, values), style in zip(line.items(), ["--", ":", "-"]):
    top.plot(h, values, style, label=name)
top.plot(h, exact, "-", color="0.6", lw=0.8, label=f"gaussian on the {L}³ supercell (its own Debye–Waller)")
top.errorbar(h, mean, yerr=stderr, fmt=".", color="k", ms=4,
             label=f"sampling, quantum ({L}³ primitive cells, {n_samples} samples)")
top.set_yscale("log")
top.set_ylabel("I (e.u./atom)")
top.set_title(f"EMT Ni at {T:g} K along (h, ½, 0)")
top.legend(fontsize=8)
bottom.plot(h, 1 - one_q / gauss, "-", color="C2", label="multi-phonon share 1 − I₁/I (quantum)")
bottom.plot(h, one_q / one_c - 1, "-", color="C1", label="I₁ quantum / classical − 1")
bottom.axhline(0, color="k", lw=0.8)
bottom.set_xlabel("h (r.l.u.)")
bottom.legend(fontsize=8)
fig.tight_layout()
fig.savefig(args.out / "forward_models.png", dpi=120)
print(f"\nwrote {args.out}/forward_models.png in {time.time() - t0:.0f} s")
