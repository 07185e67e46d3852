"""What the dipole–dipole forces of Born charges cost (issue 20): NaCl, the same Q, with and without them.

Crystal: rocksalt NaCl (phonopy's example structure), 3 shells of springs, and phonopy's example BORN (Z*, ε∞)
switched on or off — the same force constants either way, so the ratio is the cost of the Gonze–Lee Ewald sum
alone. Timed, best of `--repeat`, one process:
- ase_tds one-phonon: forward at fixed θ (its Debye–Waller factor computed once, as euphonic is given one: the
  per-Q work), and forward + backward (the gradient a fit needs: everything recomputed), on `--n-q` random Q;
- ase_tds all-order ("gaussian", one fixed grid for both): forward + backward on `--n-q-gaussian` random Q, the
  real-space covariance of the grid recomputed in each (as in a fit, where θ changes every step);
- peer: euphonic's dipole-corrected phonons and one-phonon structure factor on the same Q (its own subprocess,
  `one_phonon_vs_euphonic.euphonic_in_subprocess`), with and without the Born charges in its file.

    python benchmarks/dipole_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
NACL = ROOT / "tests" / "data" / "dft" / "NaCl"


def nacl_models():
    """(without, with) Born charges: one NaCl spring model, and a copy carrying phonopy's example BORN."""
    import copy

    import phonopy
    from ase import Atoms

    from ase_tds import ForceConstantModel
    from ase_tds.dipole import BornCharges

    unit = phonopy.load(NACL / "phonopy_params.yaml", produce_fc=False, log_level=0).unitcell
    atoms = Atoms(unit.symbols, cell=unit.cell, scaled_positions=unit.scaled_positions, pbc=True)
    plain = ForceConstantModel(atoms, shells=3).set_from_springs(300.0)
    polar = copy.deepcopy(plain)
    polar.set_born(BornCharges.from_phonopy_born(NACL / "BORN", polar.primitive))
    return plain, polar


def time_model(model, q, method: str, repeat: int, **options) -> dict:
    """Forward and forward + backward wall times (s) of `method` on q (B, 3) Å⁻¹."""
    import torch

    from _common import best_of
    from ase_tds import tds_model

    tds = tds_model(model, 300.0, method=method, statistics="quantum", **options)
    qt = torch.as_tensor(q)

    def forward():
        with torch.no_grad():
            tds(qt)  # the Debye–Waller factor once per θ (as euphonic's, given to it): the per-Q work

    def forward_backward():
        model.theta.grad = None
        tds(qt).sum().backward()

    forward()
    return {"forward_s": best_of(forward, repeat), "forward_backward_s": best_of(forward_backward, repeat),
            "n_q": len(q), "msd": tds.mean_square_displacement().detach().numpy() if method == "one-phonon" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer Q, one repeat")
    parser.add_argument("--n-q", type=int, default=20_000, help="Q for the one-phonon model and euphonic")
    parser.add_argument("--n-q-gaussian", type=int, default=2000, help="Q for the all-order model")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.n_q, args.n_q_gaussian, args.repeat = 2000, 300, 1

    from _common import machine, random_q, write_json
    from ase_tds import tds_model
    from one_phonon_vs_euphonic import euphonic_in_subprocess

    plain, polar = nacl_models()
    q = random_q(plain, args.n_q, q_max=7.0)
    grid = tds_model(polar, 300.0, method="gaussian", q_max=7.0).grid  # the converged grid of the polar crystal
    rows = {}
    for label, model in (("without", plain), ("with", polar)):
        one = time_model(model, q, "one-phonon", args.repeat)
        msd = one.pop("msd")
        gaussian = time_model(model, q[: args.n_q_gaussian], "gaussian", args.repeat, grid=grid)
        gaussian.pop("msd")
        peer = euphonic_in_subprocess(model, q, msd, 300.0, args.repeat, 8)
        rows[label] = {"one_phonon": one, "gaussian": gaussian, "euphonic_s": peer["seconds"]}
        print(f"{label} Born charges: one-phonon forward {one['forward_s']:.3f} s, +backward "
              f"{one['forward_backward_s']:.3f} s ({len(q)} Q); all-order forward + backward "
              f"{gaussian['forward_backward_s']:.3f} s ({args.n_q_gaussian} Q, grid {grid}); euphonic "
              f"{peer['seconds']:.3f} s", flush=True)
    ratios = {
        "one_phonon_forward_with_over_without": rows["with"]["one_phonon"]["forward_s"]
        / rows["without"]["one_phonon"]["forward_s"],
        "one_phonon_gradient_with_over_without": rows["with"]["one_phonon"]["forward_backward_s"]
        / rows["without"]["one_phonon"]["forward_backward_s"],
        "all_order_gradient_with_over_without": rows["with"]["gaussian"]["forward_backward_s"]
        / rows["without"]["gaussian"]["forward_backward_s"],
        "euphonic_with_over_without": rows["with"]["euphonic_s"] / rows["without"]["euphonic_s"],
        "ase_tds_one_phonon_forward_over_euphonic_with_dipoles": rows["with"]["one_phonon"]["forward_s"]
        / rows["with"]["euphonic_s"],
    }
    for key, value in ratios.items():
        print(f"  {key}: {value:.2f}")
    write_json("dipole_cost_quick.json" if args.quick else "dipole_cost.json",
               {"machine": machine(), "args": vars(args), "grid": list(grid), "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
