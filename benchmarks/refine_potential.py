"""Acceptance of `ase_tds.refine` (issue 24): a machine-learned potential's own weights refined against TDS.

Truth, by crystal (`--crystal`):
- ni: the published Born–von Kármán constants of nickel at 296 K (Birgeneau et al., Phys. Rev. 136, A1359 (1964)),
  built into phonopy directly (tests/reference_tds.py); 5 shells refined.
- si: silicon's DFT force constants as they are, untruncated (phonopy's example, tests/data/dft/Si), at 300 K; two
  atoms per primitive cell, 4 shells refined (the range `--cutoff auto` chose on such data, benchmarks/real_crystals.py).
Data: that crystal's all-order diffuse intensity from the independent reference (a periodic crystal's exact
intensity, phonopy's eigen-solver and numpy) at Q on its reciprocal lattice, |Q| ≤ 8 Å⁻¹, > 0.1 r.l.u. from Bragg
peaks, 0.3 % Poisson noise. The potential (CHGNet by default) is refined with `ase_tds.refine.refine` (its readout),
then judged independently of ase_tds: phonopy finite displacements with the refined potential's own ASE calculator
(reloaded from the saved file) on a 4×4×4 (ni) or 3×3×3 (si) conventional supercell, frequencies at X, L, W, K
against the truth's (tolerance 0.1 THz); the lattice constant (equation of state) within 0.5 %; the anchor drift
reported; an NVT MD run (Langevin, 300 K) of the refined potential checked for stability (temperature and energy
stay bounded, no atom moves more than 1 Å).

    python benchmarks/refine_potential.py [--crystal ni|si] [--potential chgnet|sevenn] [--layers PREFIX ...]
        [--points 1000] [--max-iter 200] [--md-ps 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import reference_tds as ref  # noqa: E402
from _common import write_json  # noqa: E402

POINTS = {"X": [1, 0, 0], "L": [0.5, 0.5, 0.5], "W": [1, 0.5, 0], "K": [0.75, 0.75, 0]}  # hkl, conventional cell


@dataclass(frozen=True)
class Crystal:
    """A crystal of the acceptance: its truth, the conventional cell the data index, and the settings."""

    name: str
    temperature: float
    mesh: tuple  # the periodic crystal of the reference intensities
    shells: int
    judge_supercell: int  # conventional cells per edge of phonopy's finite-displacement supercell

    def truth(self):
        """phonopy.Phonopy of the truth (force constants produced)."""
        if self.name == "ni":
            return ref.birgeneau_ni_phonopy()
        import phonopy

        return phonopy.load(ROOT / "tests" / "data" / "dft" / "Si" / "phonopy_params.yaml", produce_fc=True,
                            log_level=0)

    def conventional(self):
        from ase.build import bulk

        if self.name == "ni":
            return bulk("Ni", "fcc", a=ref.NI_A, cubic=True)
        a = float(np.linalg.norm(np.array(self.truth().primitive.cell)[0]) * np.sqrt(2))  # fcc: a = √2 |a_prim|
        return bulk("Si", "diamond", a=a, cubic=True)


CRYSTALS = {"ni": Crystal("ni", 296.0, (24, 24, 24), 5, 4), "si": Crystal("si", 300.0, (32, 32, 32), 4, 3)}


def make_data(crystal: Crystal, n_points: int, rng):
    from ase_tds import TDSData
    from ase_tds.data import add_poisson_noise

    ph = crystal.truth()
    prim = np.array(ph.primitive.cell)
    cell = crystal.conventional().cell[:]
    q = ref.commensurate_points(prim, crystal.mesh, n_points, 8.0, rng, bragg_cell=cell)
    intensity = ref.periodic_crystal_intensity(ph, q, crystal.mesh, crystal.temperature)
    data = TDSData.from_hkl(q @ cell.T / (2 * np.pi), intensity, cell, temperature=crystal.temperature,
                            units="e.u./atom")
    return add_poisson_noise(data, 1.1e5, rng).mask_bragg(0.1, prim)


def phonopy_frequencies(crystal: Crystal, calc) -> np.ndarray:
    """Frequencies (4, 3n) THz at X, L, W, K of `calc` by phonopy's own finite displacements (no ase_tds)."""
    from ase import Atoms
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = crystal.conventional()
    ph = Phonopy(PhonopyAtoms(symbols=unit.get_chemical_symbols(), cell=unit.cell[:],
                              scaled_positions=unit.get_scaled_positions()),
                 supercell_matrix=np.eye(3, dtype=int) * crystal.judge_supercell, primitive_matrix="auto")
    ph.generate_displacements(distance=0.01)
    forces = []
    for cell in ph.supercells_with_displacements:
        atoms = Atoms(cell.symbols, cell=cell.cell, positions=cell.positions, pbc=True)
        atoms.calc = calc
        forces.append(atoms.get_forces())
    ph.forces = np.array(forces)
    ph.produce_force_constants()
    return frequencies_at_points(crystal, ph)


def frequencies_at_points(crystal: Crystal, ph) -> np.ndarray:
    cell = crystal.conventional().cell[:]
    q_cart = np.array(list(POINTS.values())) @ (2 * np.pi * np.linalg.inv(cell).T)
    q_frac = q_cart @ np.array(ph.primitive.cell).T / (2 * np.pi)
    return np.array([ph.get_frequencies(q) for q in q_frac])


def md_stability(crystal: Crystal, calc, picoseconds: float) -> dict:
    """Langevin NVT at 300 K on a 2×2×2 conventional cell (32 or 64 atoms), 2 fs steps."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = crystal.conventional().repeat(2)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    start = atoms.positions.copy()
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=300, friction=0.02, rng=np.random.default_rng(1))
    temperatures, energies = [], []
    for _ in range(int(round(picoseconds * 500 / 10))):
        dyn.run(10)
        temperatures.append(atoms.get_temperature())
        energies.append(atoms.get_potential_energy() / len(atoms))
    moved = np.linalg.norm(atoms.positions - start - (atoms.positions - start).mean(axis=0), axis=1).max()
    half = len(temperatures) // 2
    record = {"picoseconds": picoseconds, "mean_temperature_K": float(np.mean(temperatures[half:])),
              "max_temperature_K": float(np.max(temperatures)), "largest_displacement_A": float(moved),
              "potential_energy_spread_meV_per_atom": float(1e3 * np.ptp(energies))}
    record["stable"] = bool(record["max_temperature_K"] < 600 and moved < 1.0)
    return record


def main() -> None:
    import warnings

    from ase_tds.refine import load_potential, refine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crystal", default="ni", choices=list(CRYSTALS))
    parser.add_argument("--potential", default="chgnet")
    parser.add_argument("--layers", nargs="+", help="name prefixes of the weights refined (default: the potential's "
                        "readout); the record's file name then ends in _layers")
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--md-ps", type=float, default=1.0)
    args = parser.parse_args()
    crystal = CRYSTALS[args.crystal]
    rng = np.random.default_rng(24)
    t0 = time.time()
    data = make_data(crystal, args.points, rng)
    print(f"data: {int(data.mask.sum())} points in {time.time() - t0:.0f} s", flush=True)
    truth = frequencies_at_points(crystal, crystal.truth())
    potential = load_potential(args.potential)
    start_nu = phonopy_frequencies(crystal, potential.calculator())
    t1 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result, model = refine(potential, crystal.conventional(), data, shells=crystal.shells, max_iter=args.max_iter,
                               layers=args.layers)
    seconds = time.time() - t1
    print(result.table(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        saved = result.save(Path(tmp) / "refined", potential, model, data)
        reloaded = potential.calculator(saved)  # the refined potential from its own file
        refined_nu = phonopy_frequencies(crystal, reloaded)
        md = md_stability(crystal, reloaded, args.md_ps)
    eos = result.equation_of_state
    record = {
        "crystal": crystal.name, "potential": args.potential, "points": int(data.mask.sum()), "refine_seconds": seconds,
        "total_seconds": time.time() - t0, "iterations": len(result.history), "chi2_start": result.chi2_start,
        "chi2": result.fit.chi2, "chi2_red": result.fit.chi2_red,
        "frequencies_THz": {name: {"truth": truth[i].tolist(), "start": start_nu[i].tolist(),
                                   "refined": refined_nu[i].tolist()} for i, name in enumerate(POINTS)},
        "start_error_THz": float(np.abs(start_nu - truth).max()),
        "refined_error_THz": float(np.abs(refined_nu - truth).max()),
        "lattice_constant_change_percent": 100 * (eos["refined"]["lattice_scale"] / eos["start"]["lattice_scale"] - 1),
        "bulk_modulus_GPa": {"start": eos["start"]["bulk_modulus_GPa"], "refined": eos["refined"]["bulk_modulus_GPa"]},
        "anchor_drift": result.anchor_drift, "weights": result.weights, "md": md, "settings": result.settings,
        "reach": result.reach}
    record["pass"] = bool(record["refined_error_THz"] <= 0.1 and abs(record["lattice_constant_change_percent"]) <= 0.5
                          and md["stable"])
    print(f"{args.potential} on {crystal.name}: X/L/W/K error {record['start_error_THz']:.3f} → "
          f"{record['refined_error_THz']:.3f} THz "
          f"(phonopy, its own calculator), lattice constant {record['lattice_constant_change_percent']:+.3f} %, "
          f"MD {'stable' if md['stable'] else 'UNSTABLE'}, {record['total_seconds']:.0f} s → "
          f"{'pass' if record['pass'] else 'MISS'}", flush=True)
    name = f"refine_potential_{args.potential}" + ("" if crystal.name == "ni" else f"_{crystal.name}")
    write_json(name + ("_layers" if args.layers else "") + ".json", record)


if __name__ == "__main__":
    main()
