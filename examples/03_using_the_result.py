"""Tutorial 3 — using fitted force constants: ASE molecular dynamics, phonopy, MLIP training data.

Reads the folder a fit wrote (phonopy_params.yaml, FORCE_CONSTANTS, fit.json: what `ase-tds fit` and
tutorial 1 write) and
1. runs Langevin molecular dynamics at 300 K in ASE with the `TDSFitted` calculator, and checks the
   mean-square displacement and potential energy against the exact classical values of that supercell;
2. loads the files with phonopy for the band structure and the thermal properties;
3. writes thermal configurations with harmonic energies and forces as extxyz for a machine-learned
   potential (`ase_tds.export`), and reads them back.

    python examples/01_nickel_benchmark.py && python examples/03_using_the_result.py
    python examples/03_using_the_result.py --fast    # fewer MD steps and configurations (also ASE_TDS_FAST=1)

Writes into --out (default examples_out/03_using_the_result): md.png, band_structure.png,
thermal_properties.png, train.extxyz.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import ase.io
import matplotlib.pyplot as plt
import numpy as np
import phonopy
from ase import units
from ase.build import bulk
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from phonopy.phonon.band_structure import get_band_qpoints_and_path_connections

from ase_tds import TDSFitted
from ase_tds.export import write_training_data
from ase_tds.sampling import DenseSampler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", default=os.environ.get("ASE_TDS_FAST") == "1",
                    help="fewer MD steps and configurations (CI)")
parser.add_argument("--fitted", type=Path, default=Path("examples_out/01_nickel_benchmark/fitted"),
                    help="folder with phonopy_params.yaml (default: what tutorial 1 writes)")
parser.add_argument("--out", type=Path, default=Path("examples_out/03_using_the_result"))
args = parser.parse_args()
if not (args.fitted / "phonopy_params.yaml").exists():
    sys.exit(f"{args.fitted}/phonopy_params.yaml not found: run examples/01_nickel_benchmark.py first, "
             "or pass --fitted DIR (a folder written by `ase-tds fit`)")
n_steps, n_configurations = (300, 10) if args.fast else (4000, 100)
args.out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
T = 300.0

# 1. Molecular dynamics: a 4×4×4 supercell of the cubic cell (256 atoms), Langevin thermostat at 300 K.
calc = TDSFitted(args.fitted)  # harmonic: E = ½ uᵀΦu (eV), F = −Φu (eV/Å), u from the lattice sites
print(f"TDSFitted from {args.fitted}: {calc.model}")
atoms = bulk("Ni", "fcc", a=3.52, cubic=True).repeat(4)
atoms.calc = calc
atoms.set_constraint(FixCom())  # the centre of mass stays put, as in the force constants' statistics
# starting at rest on the lattice sites, the thermostat (friction 0.02/fs) heats the crystal within ~0.1 ps
dynamics = Langevin(atoms, 5 * units.fs, temperature_K=T, friction=0.02 / units.fs, fixcm=False,
                    rng=np.random.default_rng(1))
record = {"time (ps)": [], "T (K)": [], "E_pot (eV/atom)": [], "⟨u_x²⟩ (Å²)": []}


def observe():
    u, _ = calc.displacements(atoms)
    record["time (ps)"].append(dynamics.get_time() / (1000 * units.fs))
    record["T (K)"].append(atoms.get_temperature())
    record["E_pot (eV/atom)"].append(atoms.get_potential_energy() / len(atoms))
    record["⟨u_x²⟩ (Å²)"].append(np.mean(u**2))


dynamics.attach(observe, interval=10)
dynamics.run(n_steps)
equilibrated = slice(len(record["T (K)"]) // 4, None)  # the first quarter is equilibration
md = {key: np.mean(values[equilibrated]) for key, values in record.items()}
# exact classical values of this periodic supercell (centre of mass fixed): from the dense Cholesky sampler
exact_msd = DenseSampler(calc.model, (4, 4, 4), T, progress=False).mean_square_displacement().detach()[0].trace() / 3
exact_epot = (3 * len(atoms) - 3) / 2 * units.kB * T / len(atoms)
print(f"MD: {n_steps} steps of 5 fs; averages over the last {n_steps * 3 // 4} steps")
print(f"  T = {md['T (K)']:.1f} K (thermostat {T:g} K)")
print(f"  ⟨u_x²⟩ = {md['⟨u_x²⟩ (Å²)']:.5f} Å²   exact classical for this supercell {exact_msd:.5f} Å²")
print(f"  E_pot = {1000 * md['E_pot (eV/atom)']:.3f} meV/atom   "
      f"equipartition (3N−3)/2·k_BT/N = {1000 * exact_epot:.3f} meV/atom")
fig, axes = plt.subplots(3, 1, figsize=(7, 6.5), sharex=True)
for ax, key, reference in zip(axes, ["T (K)", "E_pot (eV/atom)", "⟨u_x²⟩ (Å²)"], [T, exact_epot, exact_msd]):
    ax.plot(record["time (ps)"], record[key], lw=0.8)
    ax.axhline(reference, color="k", ls="--", lw=0.8)
    ax.set_ylabel(key)
axes[0].set_title("Langevin MD of Ni with TDSFitted, 256 atoms (dashed: exact classical values)")
axes[-1].set_xlabel("time (ps)")
fig.tight_layout()
fig.savefig(args.out / "md.png", dpi=110)

# 2. phonopy: band structure and thermal properties from the written file.
ph = phonopy.load(args.fitted / "phonopy_params.yaml", produce_fc=False, log_level=0)
conventional = {"Γ": [0, 0, 0], "X": [1, 0, 0], "U": [1, 0.25, 0.25], "K": [0.75, 0.75, 0], "L": [0.5, 0.5, 0.5],
                "W": [1, 0.5, 0]}  # r.l.u. of the cubic cell; phonopy wants the primitive reciprocal basis
path = [[conventional[p] @ np.asarray(ph.primitive_matrix) for p in segment]
        for segment in (["Γ", "X", "U"], ["K", "Γ", "L", "W", "X"])]
qpoints, connections = get_band_qpoints_and_path_connections(path, npoints=51)
ph.run_band_structure(qpoints, path_connections=connections, labels=["Γ", "X", "U", "K", "Γ", "L", "W", "X"])
ph.plot_band_structure().savefig(args.out / "band_structure.png", dpi=110)
highest = max(f.max() for f in ph.band_structure.frequencies)
print(f"\nphonopy band structure: highest frequency {highest:.3f} THz")
ph.run_mesh([24, 24, 24], is_gamma_center=True)
ph.run_thermal_properties(t_min=0, t_max=1000, t_step=10)
thermal = ph.thermal_properties
print("phonopy thermal properties on a 24³ mesh, per mole of primitive cells (here: of Ni atoms)")
print(f"{'T (K)':>6}{'F (kJ/mol)':>12}{'S (J/K/mol)':>13}{'C_v (J/K/mol)':>15}")
for row in list(zip(thermal.temperatures, thermal.free_energy, thermal.entropy, thermal.heat_capacity))[::10]:
    print("{:>6.0f}{:>12.3f}{:>13.3f}{:>15.3f}".format(*row))
print(f"(C_v → 3R = {3 * units.mol * units.kB / units.J:.3f} J/K/mol at high T, Dulong–Petit)")
ph.plot_thermal_properties().savefig(args.out / "thermal_properties.png", dpi=110)

# 3. Training data for a machine-learned potential: classical thermal configurations of the same supercell.
path = write_training_data(args.fitted, args.out / "train.extxyz", supercell=(4, 4, 4), temperature=T,
                           n_samples=n_configurations, seed=0)
frames = ase.io.read(path, ":")
energies = np.array([frame.info["REF_energy"] for frame in frames])
forces = np.concatenate([frame.arrays["REF_forces"] for frame in frames])
print(f"\n{path}: {len(frames)} configurations of {len(frames[0])} atoms, info keys {sorted(frames[0].info)}")
print(f"  mean REF_energy {1000 * energies.mean() / len(frames[0]):.3f} meV/atom "
      f"(equipartition {1000 * exact_epot:.3f}), rms REF_forces {np.sqrt((forces**2).mean()):.3f} eV/Å")
print(f"\nwrote {args.out}/md.png, band_structure.png, thermal_properties.png, train.extxyz "
      f"in {time.time() - t0:.0f} s")
