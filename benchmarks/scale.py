"""Scale (issue 12): loss + gradient throughput and peak memory against the number of points, 1 and 2 ranks, and
a whole NeXus volume of 10⁶ voxels fitted by `ase-tds fit`.

Peer in the same run: the same evaluation on one process (the 2-rank figure is the ratio against it). Each figure
comes from its own subprocess, so that its peak resident memory (ru_maxrss) is its own:

- throughput: points/s of one evaluation of the fit's profiled χ² and its gradient (`_Objective.evaluate`, chunks
  of CHUNK_POINTS points) at the converged default gaussian model, after one warm-up evaluation; N = 10⁴, 10⁵, 10⁶
  (MgB₂: 10⁴, 10⁵);
  crystals: Ni (1 atom, 5 shells, 16 parameters) and MgB₂ (3 atoms, pairs to 4.8 Å: 45 parameters);
  2 ranks by torchrun (gloo), the wall time of rank 0, the peak memory of each rank;
- volume: a 100³-voxel NeXus NXdata cube at 300 K, Bragg neighbourhoods NaN, 0.3 % Poisson noise, fitted by the
  command a user types, `python -m ase_tds fit ... --start springs`: wall time, peak memory, iterations, worst
  |Δθ|/|θ₁|, the largest pull, and phonopy's band path of the written files against the truth's.
  Ni (`--volume-crystal Ni`, the default): hkl step 0.02 r.l.u. from (0.5, 0.5, 0.5); the truth EMT nickel, simulated
  by an independent discretisation (the per-point gaussian model on a crystal twice the converged default's, its
  near-Bragg crystals 2× and 3× that); fitted with the default range.
  MgB₂ (`--volume-crystal MgB2`, issue 22's acceptance): the fft part's MgB₂ volume (DFT constants on pairs to
  4.8 Å); simulated by the FFT route on the smallest multiple of the voxels' crystal at least 1.25× the fit's per
  axis (80×80×80 cells against the fit's 60×60×40; at 2×, 120×120×80, the simulation alone took > 10 min and 9.5 GB;
  the per-point route would take ~9 h here for 10⁶ voxels; the two routes agree to 10⁻⁶ on the same crystal,
  tests/test_fft.py); fitted at the truth's `--cutoff 4.8`, so that θ can be compared.

- fft (issue 22): one evaluation of the loss and its gradient on a whole volume of voxels, by the FFT route (the
  model "fft" that `fit` picks for points on a grid) against the per-point gaussian route (its converged default,
  near-Bragg crystals included), each in its own process at the same θ (the truth), after one warm-up evaluation.
  The FFT route is timed on every voxel; the per-point route on a random subset of PER_POINT_SUBSET voxels, its
  time scaled by the number of voxels (its cost is linear in them); peak resident memory of each process. Volumes:
  Ni, conventional cell, hkl from 0.5 in steps of 0.02 (the volume part's cube; 100³ = 10⁶ voxels at full size);
  MgB₂ (hexagonal cell, pairs to 4.8 Å), hkl from (−2.5, −2.5, −1.25) in steps (0.05, 0.05, 0.025). Bragg
  neighbourhoods (0.1 r.l.u.) masked.

  `--fft-side 216` (10⁷ voxels, the streaming case: the per-point route is still timed on its subset) is kept under
  its own key, fft_side_216. Each crystal's record reaches results/scale.json as soon as it is measured (a failed run is recorded with its
  error; `--fft-crystals` runs some of them, keeping the others' earlier records), with the load average.

    python benchmarks/scale.py [--quick] [--parts throughput,volume,fft] [--volume-crystal Ni|MgB2] [--fft-side 100]
        [--fft-crystals Ni,MgB2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from math import ceil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import earlier_record, write_json  # noqa: E402

T = 300.0


def crystal(name: str):
    """(truth model, structure): Ni with EMT's constants, or MgB₂ with the DFT constants (any_crystal's truth)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from ase_tds import ForceConstantModel

    if name == "Ni":
        atoms = bulk("Ni", "fcc", a=3.52, cubic=True)
        return ForceConstantModel(atoms, shells=5).set_from_calculator(EMT(), progress=False), atoms
    import any_crystal

    any_crystal.CUTOFF["MgB2"] = 4.8
    truth = any_crystal.truth_model("MgB2")
    return truth, truth.unitcell


def worker(name: str, n: int) -> None:
    """One evaluation's throughput and this process's peak memory, as JSON on stdout (rank 0's)."""
    import importlib

    import torch

    from ase_tds import TDSData, distributed, tds_model

    fit_module = importlib.import_module("ase_tds.fitting.objective")
    distributed.start()
    truth, atoms = crystal(name)
    rng = np.random.default_rng(0)
    hkl = rng.uniform(-4, 4, size=(n, 3))
    q = truth.q_from_hkl(hkl)
    data = TDSData.from_hkl(hkl, np.ones(n), atoms.cell[:], sigma=np.full(n, 0.01), temperature=T,
                            units="e.u./atom").mask_bragg(0.1, truth.primitive.cell[:])
    tds = tds_model(truth, T, q_max=float(np.linalg.norm(q, axis=1).max()))
    objective = fit_module.Objective(tds, data, "fixed", "free", "chi2")
    theta = truth.theta.detach().numpy()
    objective.evaluate(theta)  # warm-up: the model's caches
    t0 = time.perf_counter()
    objective.evaluate(theta)
    seconds = time.perf_counter() - t0
    peak = distributed.total(float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20)  # GiB, all ranks
    if distributed.is_main():
        print(json.dumps({"crystal": name, "points": int(objective.n_total), "parameters": truth.n_params,
                          "ranks": distributed.size(), "grid": list(tds.grid), "seconds": seconds,
                          "points_per_s": objective.n_total / seconds, "peak_GiB_all_ranks": peak,
                          "threads": torch.get_num_threads()}))
    distributed.stop()


def run_worker(name: str, n: int, ranks: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(n)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                   str(Path(__file__).resolve()), "--worker", name, str(n)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, os.cpu_count() // ranks)))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    record = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name} N={record['points']:>8} ranks={ranks}: {record['seconds']:7.2f} s, "
          f"{record['points_per_s']:9.0f} points/s, peak {record['peak_GiB_all_ranks']:.2f} GiB", flush=True)
    return record


def volume(quick: bool, name: str = "Ni") -> dict:
    """A NeXus cube fitted by the command a user types; wall time and peak memory of that command."""
    import h5py
    import torch

    from ase_tds import TDSData, tds_model
    from ase_tds.data import add_poisson_noise

    import tempfile

    side = 40 if quick else 100
    truth, hkl, cell = fft_volume(name, side)
    atoms = truth.unitcell
    folder = Path(tempfile.mkdtemp(prefix="scale-"))
    t0 = time.time()
    q = truth.q_from_hkl(hkl, cell)
    q_max = float(np.linalg.norm(q, axis=1).max())
    if name == "Ni":  # the independent discretisation: the per-point route on twice the default crystal
        default = tds_model(truth, T, q_max=q_max)
        reference = default.with_grid(tuple(2 * x for x in default.grid))
    else:  # the smallest multiple of the voxels' crystal ≥ 1.25× the fit's: 2× (MgB₂: 120×120×80) takes > 10 min
        default = tds_model(truth, T, q_max=q_max, voxels=q)
        reference = default.with_grid(tuple(v * ceil(1.25 * g / v) for v, g in zip(default.voxel_grid, default.grid)))
    with torch.no_grad():
        intensity = reference(torch.as_tensor(q)).numpy()
    clean = TDSData.from_hkl(hkl, intensity, cell, temperature=T, units="e.u./atom")
    data = add_poisson_noise(clean, 1.1e5, np.random.default_rng(1))
    print(f"  simulated {len(hkl)} voxels by the {default.name} route on {reference.grid} (the fit's default "
          f"{default.grid}): {time.time() - t0:.0f} s", flush=True)
    bragg = ~data.mask_bragg(0.1, truth.primitive.cell[:]).mask
    values, sigma = data.intensity.copy(), data.sigma.copy()
    values[bragg] = sigma[bragg] = np.nan
    path = folder / "volume.nxs"
    axes = [np.unique(hkl[:, i]) for i in range(3)]
    with h5py.File(path, "w") as f:
        group = f.create_group("entry/data")
        group.attrs.update(NX_class="NXdata", signal="data", axes=["H", "K", "L"], temperature=T, units="e.u./atom")
        group["data"] = values.reshape(side, side, side)
        group["errors"] = sigma.reshape(side, side, side)
        group["H"], group["K"], group["L"] = axes
    atoms.write(folder / f"{name}.cif")
    out = {"crystal": name, "voxels": len(hkl),
           "simulation": {"route": default.name, "grid": list(reference.grid), "default_grid": list(default.grid)}}
    range_arguments = [] if name == "Ni" else ["--cutoff", f"{truth.cutoff:.4f}"]
    command = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "ase_tds", "fit", str(folder / f"{name}.cif"),
               str(path), "--start", "springs", *range_arguments, "--out", str(folder / "fit"),
               "--checkpoint", str(folder / "fit.ckpt")]  # run this command again to resume an interrupted fit
    log = folder / "fit.log"  # the command's own progress, to follow with `tail -f` while it runs
    print(f"  fitting: {' '.join(command)} (log: {log})", flush=True)
    with open(log, "w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, text=True)
    lines = log.read_text().strip().splitlines()
    if not (folder / "fit" / "fit.json").exists():
        raise RuntimeError("\n".join(lines[-40:]))
    peak_kib, wall = (float(x) for x in lines[-1].split())
    record = json.loads((folder / "fit" / "fit.json").read_text())
    out.update(points=record["n_points"], exit_code=done.returncode, wall_s=wall, peak_GiB=peak_kib / 2**20,
               iterations=record["iterations"], first_fit=record["settings"].get("first_fit"),
               route=record["settings"].get("route"), chi2_red=record["chi2_red"],
               grid=record["settings"].get("grid"), model_error=record.get("model_error"),
               band_path_THz=band_path_error(truth, folder / "fit" / "phonopy_params.yaml"))
    labels = [p["label"] for p in record["parameters"]]
    if labels == list(truth.labels):
        theta = np.array([p["value"] for p in record["parameters"]])
        sigma_theta = np.array([p["sigma"] for p in record["parameters"]])
        true = truth.theta.detach().numpy()
        out.update(worst_theta_of_first=float(np.abs(theta - true).max() / abs(true[0])),
                   largest_pull=float(np.abs((theta - true) / sigma_theta).max()))
    print(f"  volume: {out}", flush=True)
    return out


def band_path_error(truth, fitted_file: Path) -> dict:
    """RMS and worst |Δν| (THz) of phonopy's frequencies of the written files against the truth's on ASE's standard
    band path (200 points, Γ left out)."""
    import phonopy

    fitted = phonopy.load(fitted_file, log_level=0)
    path = truth.primitive.cell.bandpath(npoints=200)
    kpts = path.kpts[np.linalg.norm(path.kpts, axis=1) > 1e-9]
    q = kpts @ (2 * np.pi * np.linalg.inv(truth.primitive.cell[:]).T)
    ours = truth.frequencies(q)
    fitted.run_qpoints(q @ np.array(fitted.primitive.cell).T / (2 * np.pi))
    diff = np.sort(fitted.qpoints.frequencies, axis=1) - np.sort(ours, axis=1)
    return {"rms": float(np.sqrt(np.mean(diff**2))), "worst": float(np.abs(diff).max())}


PER_POINT_SUBSET = 2000  # voxels the per-point route is timed on


def fft_volume(name: str, side: int):
    """(truth, hkl (side³, 3) of the volume in r.l.u. of `cell`, cell (3, 3) Å): the fft part's voxels."""
    truth, atoms = crystal(name)
    origin, step = ((0.5, 0.5, 0.5), (0.02, 0.02, 0.02)) if name == "Ni" else ((-2.5, -2.5, -1.25), (0.05, 0.05, 0.025))
    axes = [np.round(o + d * np.arange(side), 6) for o, d in zip(origin, step)]
    hkl = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return truth, hkl, atoms.cell[:]


def fft_worker(name: str, side: int, route: str) -> None:
    """Loss + gradient of the volume by `route` ("fft": every voxel; "per-point": PER_POINT_SUBSET of them), its time,
    the time scaled to every voxel, and this process's peak memory, as JSON on stdout."""
    import importlib

    import torch

    from ase_tds import TDSData, tds_model

    objective_module = importlib.import_module("ase_tds.fitting.objective")
    truth, hkl, cell = fft_volume(name, side)
    data = TDSData.from_hkl(hkl, np.ones(len(hkl)), cell, sigma=np.full(len(hkl), 0.01), temperature=T,
                            units="e.u./atom").mask_bragg(0.1, truth.primitive.cell[:])
    used = np.flatnonzero(data.mask)
    q = data.q[used]
    q_max = float(np.linalg.norm(q, axis=1).max())
    t0 = time.perf_counter()
    if route == "fft":
        tds = tds_model(truth, T, q_max=q_max, voxels=q)
        assert tds.name == "fft"
    else:
        tds = tds_model(truth, T, q_max=q_max)
        used = np.sort(np.random.default_rng(0).choice(used, min(PER_POINT_SUBSET, len(used)), replace=False))
        data = data.select(used)
    built = time.perf_counter() - t0
    objective = objective_module.Objective(tds, data, "fixed", "free", "chi2")
    theta = truth.theta.detach().numpy()
    objective.evaluate(theta)  # warm-up: the model's caches
    t0 = time.perf_counter()
    objective.evaluate(theta)
    seconds = time.perf_counter() - t0
    print(json.dumps({"crystal": name, "route": route, "voxels": side**3, "used_voxels": int(data.mask.sum()),
                      "timed_points": objective.n_total, "grid": list(tds.grid), "settings": tds.settings(),
                      "model_seconds": built, "seconds": seconds,
                      "seconds_all_voxels": seconds * (len(q) / objective.n_total),
                      "peak_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "threads": torch.get_num_threads(), "load_average": os.getloadavg()}, default=str))


def fft_versus_per_point(side: int, crystals=("Ni", "MgB2"), save=None) -> list:
    """Each crystal's volume by both routes, each in its own process; the ratio of their times for every voxel.
    `save(out)` after each crystal (the records so far reach the JSON even if a later one fails); a failed run is
    recorded with its error."""
    out = []
    for name in crystals:
        runs = {}
        for route in ("fft", "per-point"):
            command = [sys.executable, str(Path(__file__).resolve()), "--fft-worker", name, str(side), route]
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
            if done.returncode:
                runs[route] = {"error": done.stderr[-3000:]}
                print(f"  {name} {route}: failed\n{done.stderr[-3000:]}", flush=True)
                break
            runs[route] = json.loads(done.stdout.strip().splitlines()[-1])
        if any("error" in r for r in runs.values()):
            out.append({"crystal": name, "voxels": side**3, **runs})
            if save:
                save(out)
            continue
        ratio = runs["per-point"]["seconds_all_voxels"] / runs["fft"]["seconds_all_voxels"]
        out.append({"crystal": name, "voxels": runs["fft"]["voxels"], "fft": runs["fft"],
                    "per_point": runs["per-point"], "per_point_over_fft": ratio})
        print(f"  {name} {runs['fft']['voxels']} voxels: fft {runs['fft']['seconds']:.1f} s on "
              f"{runs['fft']['grid']} (peak {runs['fft']['peak_GiB']:.2f} GiB), per-point "
              f"{runs['per-point']['seconds_all_voxels']:.0f} s scaled from {runs['per-point']['timed_points']} voxels "
              f"(peak {runs['per-point']['peak_GiB']:.2f} GiB): ratio {ratio:.0f}", flush=True)
        if save:
            save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="throughput,volume,fft")
    parser.add_argument("--volume-crystal", default="Ni", choices=["Ni", "MgB2"], help="the volume part's crystal")
    parser.add_argument("--fft-side", type=int, default=None, help="voxels per edge of the fft part's volumes "
                        "(default 100: 10⁶ voxels; --quick 60, the smallest Ni volume that takes the fft route)")
    parser.add_argument("--fft-crystals", default="Ni,MgB2", help="the fft part's crystals (Ni, MgB2)")
    parser.add_argument("--worker", nargs=2, metavar=("CRYSTAL", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--fft-worker", nargs=3, metavar=("CRYSTAL", "SIDE", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]))
    if args.fft_worker:
        return fft_worker(args.fft_worker[0], int(args.fft_worker[1]), args.fft_worker[2])
    sizes = {"Ni": (10**4, 10**5, 10**6), "MgB2": (10**4, 10**5)}  # MgB₂ at 10⁶: ~15 min per evaluation here
    if args.quick:
        sizes = {name: (10**4,) for name in sizes}
    result_file = "scale_quick.json" if args.quick else "scale.json"
    records = earlier_record(result_file)  # a part not run this time keeps its earlier record
    if "throughput" in args.parts:
        records["throughput"] = [run_worker(name, n, ranks) for name in sizes for n in sizes[name]
                                 for ranks in (1, 2)]
    if "volume" in args.parts:
        records["volume" if args.volume_crystal == "Ni" else f"volume_{args.volume_crystal}"] = volume(
            args.quick, args.volume_crystal)
    if "fft" in args.parts:
        side = args.fft_side or (60 if args.quick else 100)
        crystals = tuple(args.fft_crystals.split(","))
        key = "fft" if side in (60, 100) else f"fft_side_{side}"  # another size (10⁷ voxels: 216) kept beside
        earlier = [r for r in records.get(key) or [] if r.get("crystal") not in crystals]  # other crystals' runs

        def save(out):
            records[key] = earlier + out
            records[key + "_load_average"] = os.getloadavg()
            write_json(result_file, records)

        fft_versus_per_point(side, crystals, save)
    write_json(result_file, records)


if __name__ == "__main__":
    main()
