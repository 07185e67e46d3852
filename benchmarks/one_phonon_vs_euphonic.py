"""ase_tds one-phonon I₁(Q) against euphonic's one-phonon structure factor, on the same random Q.

Peer: euphonic `ForceConstants.calculate_qpoint_phonon_modes` + `QpointPhononModes.calculate_structure_factor(dw=...)`
from the phonopy_params.yaml written by `model.to_phonopy(...).save(..., settings={"force_constants": True})`,
run in its own subprocess (this script with --euphonic-worker): euphonic and phonopy's C extension in one
process load two OpenMP runtimes and euphonic then runs serially (see shared NOTES).

Crystals: EMT Ni (1 atom per primitive cell, default 10⁵ Q) and Ni31Cu (the 2×2×2 conventional Ni cell with
one Cu: its primitive cell really has 32 atoms, 3 shells; default 1000 Q, dw_mesh 4). ase_tds: classical and quantum statistics,
Debye–Waller on (its msd from dw_mesh: computed once per θ for the no-gradient forward, as for
euphonic; recomputed in every forward with a graph), xraydb f₀(|Q|). euphonic:
constant scattering lengths, DebyeWaller from the same msd (the per-Q work only; its own DW-on-a-mesh time is
reported separately). Also: backward/forward time of ase_tds for intensity.sum().backward().

    python benchmarks/one_phonon_vs_euphonic.py            # full run
    python benchmarks/one_phonon_vs_euphonic.py --quick    # 10⁴ / 300 Q
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def euphonic_worker(folder: str, repeat: int) -> None:
    """Runs in a fresh process: no phonopy, no ase_tds, no torch imported."""
    import euphonic
    from euphonic import ureg
    from euphonic.debye_waller import DebyeWaller

    folder = Path(folder)
    q = np.load(folder / "q.npy")
    msd = np.load(folder / "msd.npy")  # (n, 3, 3) Å² in euphonic's atom order
    spec = json.loads((folder / "spec.json").read_text())
    fc = euphonic.ForceConstants.from_phonopy(path=str(folder), summary_name="phonopy_params.yaml")
    cell = fc.crystal.cell_vectors.to("angstrom").magnitude
    qpts = q @ cell.T / (2 * np.pi)
    temperature = ureg.Quantity(spec["temperature"], "K")
    lengths = {s: ureg.Quantity(1.0, "fm") for s in set(fc.crystal.atom_type)}
    dw = DebyeWaller(fc.crystal, ureg.Quantity(0.5 * msd, "angstrom**2"), temperature)
    n_threads = os.cpu_count()

    def run():
        modes = fc.calculate_qpoint_phonon_modes(qpts, asr=None, n_threads=n_threads)
        return modes.calculate_structure_factor(scattering_lengths=lengths, dw=dw)

    run_small = lambda: fc.calculate_qpoint_phonon_modes(qpts[:50], asr=None, n_threads=n_threads)
    run_small()  # warm-up (C extension load)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sf = run()
        times.append(time.perf_counter() - t0)
    # euphonic's own Debye–Waller on a mesh (once per temperature; not included above)
    mesh = spec["dw_mesh"]
    t0 = time.perf_counter()
    grid = np.stack(np.meshgrid(*[np.arange(mesh) / mesh] * 3, indexing="ij"), -1).reshape(-1, 3)
    fc.calculate_qpoint_phonon_modes(grid, asr="reciprocal", n_threads=n_threads).calculate_debye_waller(temperature)
    dw_time = time.perf_counter() - t0
    print(json.dumps({"seconds": min(times), "all": times, "dw_mesh_seconds": dw_time, "dw_mesh": mesh,
                      "n_threads": n_threads, "checksum": float(sf.structure_factors.magnitude.sum())}))


def euphonic_in_subprocess(model, q, msd, temperature, repeat, dw_mesh) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reps = 4 if model.n_atoms == 1 else 2
        model.to_phonopy(reps * np.eye(3, dtype=int)).save(str(folder / "phonopy_params.yaml"),
                                                             settings={"force_constants": True})
        # euphonic orders atoms as phonopy's primitive; map our κ by position (mod lattice)
        import phonopy

        prim = phonopy.load(str(folder / "phonopy_params.yaml"), produce_fc=False).primitive
        order = model.site_of(prim.positions)
        np.save(folder / "q.npy", q)
        np.save(folder / "msd.npy", msd[order])
        (folder / "spec.json").write_text(json.dumps({"temperature": temperature, "dw_mesh": dw_mesh}))
        out = subprocess.run([sys.executable, __file__, "--euphonic-worker", str(folder), "--repeat", str(repeat)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def time_ours(model, q, temperature, statistics, dw_mesh, repeat) -> dict:
    import torch

    from ase_tds import tds_model
    from _common import best_of

    tds = tds_model(model, temperature, method="one-phonon", statistics=statistics, dw_mesh=dw_mesh)
    qt = torch.as_tensor(q, dtype=torch.float64)

    def forward_nograd():
        with torch.no_grad():
            tds(qt)

    def forward_grad():
        model.theta.grad = None
        return tds(qt).sum()

    def forward_backward():
        forward_grad().backward()

    forward_nograd()  # warm-up
    t_fwd = best_of(forward_nograd, repeat)
    t_fwd_grad = best_of(forward_grad, repeat)
    t_fb = best_of(forward_backward, repeat)
    with torch.no_grad():
        msd = tds.mean_square_displacement().numpy()
    return {"forward_s": t_fwd, "forward_with_graph_s": t_fwd_grad, "forward_backward_s": t_fb,
            "backward_s": t_fb - t_fwd_grad, "backward_over_forward": (t_fb - t_fwd_grad) / t_fwd_grad,
            "q_per_s": len(q) / t_fwd}, msd


def bench(name, model, n_q, temperature, dw_mesh, repeat) -> dict:
    from _common import random_q

    q = random_q(model, n_q)
    print(f"\n== {name}: {model.n_atoms} atoms per primitive cell, {n_q} random Q (|Q| ≤ 8 Å⁻¹), {temperature:g} K")
    row = {"crystal": name, "n_atoms": model.n_atoms, "n_q": n_q}
    msd = None
    for statistics in ("classical", "quantum"):
        res, msd_s = time_ours(model, q, temperature, statistics, dw_mesh, repeat)
        if statistics == "quantum":
            msd = msd_s
        row[f"ase_tds_{statistics}"] = res
        print(f"ase_tds one-phonon {statistics:9s}: forward {res['forward_s']:.3f} s = {res['q_per_s']:.3g} Q/s; "
              f"backward/forward {res['backward_over_forward']:.2f}")
    eu = euphonic_in_subprocess(model, q, msd, temperature, repeat, dw_mesh)
    eu["q_per_s"] = n_q / eu["seconds"]
    row["euphonic"] = eu
    print(f"euphonic (subprocess, {eu['n_threads']} threads): {eu['seconds']:.3f} s = {eu['q_per_s']:.3g} Q/s "
          f"(+ its DW on a {dw_mesh}³ mesh: {eu['dw_mesh_seconds']:.2f} s, once)")
    for statistics in ("classical", "quantum"):
        ratio = row[f"ase_tds_{statistics}"]["q_per_s"] / eu["q_per_s"]
        row[f"ratio_{statistics}_vs_euphonic"] = ratio
        print(f"ratio ase_tds {statistics} / euphonic (Q/s): {ratio:.2f}×")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10⁴ Q for Ni, 300 for Ni31Cu, one repeat")
    parser.add_argument("--n-q", type=int, default=100_000, help="Q for 1-atom Ni")
    parser.add_argument("--n-q-32", type=int, default=1000, help="Q for 32-atom Ni31Cu")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dw-mesh", type=int, default=8)
    parser.add_argument("--dw-mesh-32", type=int, default=4,
                        help="dw_mesh for the 32-atom cell (its Brillouin zone is 8× smaller than Ni's primitive one)")
    parser.add_argument("--skip-32", action="store_true")
    parser.add_argument("--euphonic-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.euphonic_worker:
        return euphonic_worker(args.euphonic_worker, args.repeat)
    if args.quick:
        args.n_q, args.n_q_32, args.repeat = 10_000, 300, 1

    from _common import T_ROOM, machine, ni31cu_model, nickel_model, write_json

    print(machine())
    rows = [bench("Ni (EMT)", nickel_model(), args.n_q, T_ROOM, args.dw_mesh, args.repeat)]
    if not args.skip_32:
        rows.append(bench("Ni31Cu (EMT, 3 shells)", ni31cu_model(), args.n_q_32, T_ROOM, args.dw_mesh_32,
                          args.repeat))
    goals = {"Ni": 5.0, "Ni31Cu": 3.0}
    print("\nsummary (goal: ≥5× euphonic for 1 atom, ≥3× for 32 atoms, backward ≤ 2× forward)")
    for row in rows:
        goal = goals[row["crystal"].split()[0]]
        for s in ("classical", "quantum"):
            r, bf = row[f"ratio_{s}_vs_euphonic"], row[f"ase_tds_{s}"]["backward_over_forward"]
            print(f"  {row['crystal']:<24}{s:<10} {r:6.2f}× euphonic ({'met' if r >= goal else 'MISSED'}),"
                  f" backward/forward {bf:.2f} ({'met' if bf <= 2 else 'MISSED'})")
    write_json("one_phonon_vs_euphonic.json", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
