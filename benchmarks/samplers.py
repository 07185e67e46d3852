"""Seconds per thermal-displacement sample vs supercell size: DenseSampler, QSpaceSampler, phonopy.

EMT nickel (5 shells) on L×L×L conventional cells (4L³ atoms), 300 K. For each size: the time of one
`sample(1)` from scratch (factorisation + draw: what one fresh sample of new θ costs), best of --repeat.
- DenseSampler (classical, dense Cholesky, O(N³)): up to --dense-max atoms or until a step exceeds --limit s;
- QSpaceSampler classical and quantum (O(N log N)): up to --qspace-max atoms (default ~10⁶);
- named peer: phonopy `generate_displacements(number_of_snapshots=1, temperature=T)` (its random thermal
  displacements, quantum statistics) on the same supercell with our force constants set (compact; only supercells holding the 5-shell cutoff, L ≥ 4), the Phonopy
  object built beforehand (not timed); until a step exceeds --limit s.
Ratio reported: phonopy time / QSpaceSampler quantum time at equal supercells.

    python benchmarks/samplers.py           # full (several minutes)
    python benchmarks/samplers.py --quick   # up to ~10⁴ atoms
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, T_ROOM, machine, nickel_model, write_json  # noqa: E402


def timed(func, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dense-max", type=int, default=4000)
    parser.add_argument("--qspace-max", type=int, default=1_000_200)
    parser.add_argument("--phonopy-max", type=int, default=300_000)
    parser.add_argument("--limit", type=float, default=60.0, help="stop a method after a step longer than this (s)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.dense_max, args.qspace_max, args.phonopy_max, args.repeat = 900, 14_000, 14_000, 1
    from ase_tds.sampling import DenseSampler, QSpaceSampler
    from ase_tds.structure import holds_cutoff

    print(machine())
    model = nickel_model()
    sizes = [2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 63]
    rows = []
    alive = {"dense": True, "phonopy": True}
    for length in sizes:
        n = 4 * length**3
        row = {"L": length, "n_atoms": n}
        with torch.no_grad():
            if alive["dense"] and n <= args.dense_max:
                s = DenseSampler(model, (length,) * 3, T_ROOM, progress=False)
                row["dense_s"] = timed(lambda: s.sample(1), args.repeat)
                alive["dense"] = row["dense_s"] <= args.limit
            if n <= args.qspace_max:
                for stat in ("classical", "quantum"):
                    s = QSpaceSampler(model, (length,) * 3, T_ROOM, statistics=stat, progress=False)
                    row[f"qspace_{stat}_s"] = timed(lambda: s.sample(1), args.repeat)
        if alive["phonopy"] and n <= args.phonopy_max and holds_cutoff(length * model.unitcell.cell[:], model.cutoff):
            ph = model.to_phonopy(length * np.eye(3, dtype=int))  # needs the supercell to hold the cutoff
            fc = ph.force_constants
            best = np.inf
            for _ in range(args.repeat):  # setting the new dataset clears phonopy's force constants: set them again
                ph.force_constants = fc
                t0 = time.perf_counter()
                ph.generate_displacements(number_of_snapshots=1, temperature=T_ROOM)
                best = min(best, time.perf_counter() - t0)
            row["phonopy_s"] = best
            alive["phonopy"] = row["phonopy_s"] <= args.limit
            row["phonopy_over_qspace_quantum"] = row["phonopy_s"] / row["qspace_quantum_s"]
        if len(row) == 2:
            break
        rows.append(row)
        print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

    big = [r for r in rows if "qspace_quantum_s" in r and r["n_atoms"] >= 1_000_000]
    if big:
        r = big[-1]
        print(f"goal 10⁶ atoms ≤ 10 s per sample: {r['n_atoms']} atoms quantum {r['qspace_quantum_s']:.2f} s, "
              f"classical {r['qspace_classical_s']:.2f} s: "
              f"{'met' if max(r['qspace_quantum_s'], r['qspace_classical_s']) <= 10 else 'MISSED'}")
    write_json("samplers.json", {"args": vars(args), "rows": rows})
    plot(rows)


def plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, label, style in (("dense_s", "DenseSampler (classical, dense Cholesky)", "o-"),
                              ("qspace_classical_s", "QSpaceSampler classical", "s-"),
                              ("qspace_quantum_s", "QSpaceSampler quantum", "^-"),
                              ("phonopy_s", "phonopy generate_displacements (peer)", "x--")):
        pts = [(r["n_atoms"], r[key]) for r in rows if key in r]
        if pts:
            ax.loglog(*zip(*pts), style, label=label)
    ax.axhline(10, color="grey", lw=0.8, ls=":")
    ax.axvline(1e6, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("supercell atoms")
    ax.set_ylabel("seconds per sample (from scratch)")
    ax.set_title("Thermal displacement samples, EMT Ni, 300 K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / "samplers.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
