"""Acceptance of the temperature series (issue 23, part 3): nickel data at 100, 300 and 500 K fitted jointly by
`ase-tds fit STRUCTURE a.h5 b.h5 c.h5`.

Truth: the published Born–von Kármán constants of nickel at 296 K (Birgeneau, Cordes, Dolling & Woods, Phys. Rev.
136, A1359 (1964), 5 shells), scaled linearly with temperature, θ(T) = θ₂₉₆·(1 − 2·10⁻⁴·(T − 296 K)), built into
phonopy directly (tests/reference_tds.py). Data: at each temperature that crystal's all-order diffuse intensity from
the independent converged reference (a 48³ periodic crystal's exact intensity, phonopy's eigen-solver and numpy), at
its own random Q of the reference lattice (|Q| ≤ 8 Å⁻¹, > 0.1 r.l.u. from Bragg peaks), quantum statistics, Poisson
noise of 0.3 % at the mean intensity, e.u./atom. First the 300 K file alone is fitted, `ase-tds fit Ni.cif
ni_300K.h5 --out ALONE --shells 5` (EMT start, gaussian, quantum, scale fixed for absolute data: the defaults); each
case then runs the series from there, with every other option at its default:

- linear:      `ase-tds fit Ni.cif ni_100K.h5 ni_300K.h5 ni_500K.h5 --out DIR --shells 5 --start
  ALONE/phonopy_params.yaml` (θ(T) = θ₀ + (T − T₀)·θ′, T₀ = 300 K), judged on every pull of θ₀ and θ′ ≤ 3 and on θ
  at 300 K: its 1σ below that of the 300 K file alone;
- independent: the same with `--series independent` (one θ per temperature, the default smoothness prior), judged
  on every pull of θ at each temperature ≤ 3.

Both also report the frequencies at X, L, W and K at each temperature against the truth's.

    python benchmarks/temperature_series.py [--quick] [--cases linear,independent] [--points N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_tds as ref  # noqa: E402
from _common import earlier_record, write_json  # noqa: E402
from nickel_acceptance import POINTS, conventional, truth_model  # noqa: E402

TEMPERATURES = (100.0, 300.0, 500.0)
T_PUBLISHED = 296.0
RELATIVE_SLOPE = -2e-4  # per K
MESH = (48, 48, 48)
COUNTS = 1.1e5  # at the mean intensity: 0.3 % noise
CASES = ("linear", "independent")


def factor(temperature: float) -> float:
    """θ(T)/θ₂₉₆ of the constructed truth."""
    return 1 + RELATIVE_SLOPE * (temperature - T_PUBLISHED)


def make_data(temperature: float, n_points: int, path: Path, rng) -> None:
    """The reference's data at `temperature` from the scaled published constants, noisy, written to `path`."""
    from ase_tds import TDSData
    from ase_tds.data import add_poisson_noise

    ph = ref.birgeneau_ni_phonopy()
    ph.force_constants = ph.force_constants * factor(temperature)
    prim = np.array(ph.primitive.cell)
    cell = conventional().cell[:]
    q = ref.commensurate_points(prim, MESH, n_points, 8.0, rng, bragg_cell=cell)
    t0 = time.time()
    intensity = ref.periodic_crystal_intensity(ph, q, MESH, temperature)
    print(f"  reference at {temperature:g} K, {len(q)} points: {time.time() - t0:.0f} s", flush=True)
    data = TDSData.from_hkl(q @ cell.T / (2 * np.pi), intensity, cell, temperature=temperature, units="e.u./atom")
    add_poisson_noise(data, COUNTS, rng).write(path)


def run_fit(structure: Path, files, out: Path, extra=()) -> float:
    """`python -m ase_tds fit STRUCTURE FILES... --out OUT EXTRA...`, its output in OUT.log; its wall time (s)."""
    t0 = time.time()
    command = [sys.executable, "-m", "ase_tds", "fit", str(structure), *map(str, files), "--out", str(out),
               "--overwrite", *extra]
    print("  $ " + " ".join(command[1:]), flush=True)
    log = out.with_suffix(".log")
    with open(log, "w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        print(log.read_text()[-3000:])
        raise RuntimeError(f"ase-tds fit exited {done.returncode}")
    return time.time() - t0


def frequency_errors(out: Path, record: dict, truth) -> dict:
    """{T: largest |ν_fitted − ν_true| (THz) at X, L, W, K} from each temperature's written phonopy file."""
    from ase_tds import PhonopyForceConstants

    q = truth.q_from_hkl(list(POINTS.values()))
    errors = {}
    for entry in record["per_temperature"]:
        fitted = PhonopyForceConstants(out / entry["phonopy_file"])
        true = truth.frequencies(q) * np.sqrt(factor(entry["temperature"]))  # ν ∝ √θ
        errors[f"{entry['temperature']:g}"] = float(np.abs(fitted.frequencies(q) - true).max())
    return errors


def judge_linear(out: Path, alone: Path, truth, seconds: float, seconds_alone: float) -> dict:
    record = json.loads((out / "fit.json").read_text())
    single = json.loads((alone / "fit.json").read_text())
    theta = truth.theta.detach().numpy()
    t0 = record["reference_temperature"]
    true = np.concatenate([theta * factor(t0), RELATIVE_SLOPE * theta])
    value = np.array([p["value"] for p in record["parameters"]])
    sigma = np.array([p["sigma"] for p in record["parameters"]])
    pulls = (value - true) / sigma
    labels = [p["label"] for p in record["parameters"]]
    middle = next(entry for entry in record["per_temperature"] if entry["temperature"] == 300.0)
    sigma_joint = np.array([p["sigma"] for p in middle["parameters"]])
    sigma_alone = np.array([p["sigma"] for p in single["parameters"]])
    pulls_alone = (np.array([p["value"] for p in single["parameters"]]) - theta * factor(300.0)) / sigma_alone
    ratio = sigma_joint / sigma_alone
    n = len(theta)
    result = {
        "seconds": seconds, "seconds_300K_alone": seconds_alone, "iterations": record["iterations"],
        "points": record["n_points"], "chi2_red": record["chi2_red"], "status": record["status"],
        "reference_temperature": t0, "largest_pull": float(np.abs(pulls).max()),
        "pull_label": labels[int(np.argmax(np.abs(pulls)))],
        "largest_pull_theta0": float(np.abs(pulls[:n]).max()), "largest_pull_slope": float(np.abs(pulls[n:]).max()),
        "sum_pull2": float(np.sum(pulls**2)), "parameters": len(pulls),
        "slope_1XX": {"fitted": float(value[n]), "sigma": float(sigma[n]), "true": float(true[n])},
        "sigma_300K_ratio_joint_over_alone": {"median": float(np.median(ratio)), "largest": float(ratio.max()),
                                              "1XX": float(ratio[0])},
        "largest_pull_300K_alone": float(np.abs(pulls_alone).max()),
        "worst_nu_THz": frequency_errors(out, record, truth), "warnings": record["warnings"],
    }
    result["pass"] = bool(result["largest_pull"] <= 3 and ratio.max() < 1)
    print(f"  {record['n_points']} points, {seconds:.0f} s, {record['iterations']} iterations, χ²_red "
          f"{record['chi2_red']:.3f}: largest |pull| {result['largest_pull']:.2f} ({result['pull_label']}), "
          f"σ(θ at 300 K) joint/alone median {np.median(ratio):.2f}, largest {ratio.max():.2f}; ν "
          f"{max(result['worst_nu_THz'].values()):.4f} THz → {'pass' if result['pass'] else 'MISS'}", flush=True)
    return result


def judge_independent(out: Path, truth, seconds: float) -> dict:
    record = json.loads((out / "fit.json").read_text())
    theta = truth.theta.detach().numpy()
    pulls = {}
    for entry in record["per_temperature"]:
        value = np.array([p["value"] for p in entry["parameters"]])
        sigma = np.array([p["sigma"] for p in entry["parameters"]])
        pulls[f"{entry['temperature']:g}"] = float(np.abs((value - theta * factor(entry["temperature"])) / sigma).max())
    result = {"seconds": seconds, "iterations": record["iterations"], "points": record["n_points"],
              "chi2_red": record["chi2_red"], "status": record["status"], "smoothness": record["smoothness"],
              "largest_pull_per_temperature": pulls, "worst_nu_THz": frequency_errors(out, record, truth),
              "warnings": record["warnings"]}
    result["pass"] = bool(max(pulls.values()) <= 3)
    print(f"  {record['n_points']} points, {seconds:.0f} s, {record['iterations']} iterations, χ²_red "
          f"{record['chi2_red']:.3f}: largest |pull| per temperature {pulls}; ν "
          f"{max(result['worst_nu_THz'].values()):.4f} THz → {'pass' if result['pass'] else 'MISS'}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points (smoke test)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--points", type=int, help="points per temperature (default: 5000, --quick 1000)")
    parser.add_argument("--keep", type=Path, help="a folder to keep the data, fits and logs in (default: a temporary "
                                                  "one, removed)")
    args = parser.parse_args()
    n_points = args.points or (1000 if args.quick else 5000)
    rng = np.random.default_rng(23)
    truth = truth_model()
    records = {}
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        structure = tmp / "Ni.cif"
        conventional().write(structure)
        files = [tmp / f"ni_{t:g}K.h5" for t in TEMPERATURES]
        for temperature, path in zip(TEMPERATURES, files):
            make_data(temperature, n_points, path, rng)
        print("300 K alone", flush=True)
        alone = tmp / "alone_300K"
        seconds_alone = run_fit(structure, files[1:2], alone, ("--shells", "5"))
        for case in args.cases.split(","):
            print(case, flush=True)
            out = tmp / case
            extra = ("--shells", "5", "--start", str(alone / "phonopy_params.yaml"))
            extra += ("--series", "independent") if case == "independent" else ()
            seconds = run_fit(structure, files, out, extra)
            if case == "linear":
                records[case] = judge_linear(out, alone, truth, seconds, seconds_alone)
            else:
                records[case] = judge_independent(out, truth, seconds)
            save(args.quick, n_points, records)  # after every case: a run stopped later keeps this one


def save(quick: bool, n_points: int, records: dict) -> None:
    """Write the cases' records into results/, keeping those of an earlier run's other cases."""
    name = "temperature_series_quick.json" if quick else "temperature_series.json"
    records = {**earlier_record(name).get("cases", {}), **records}
    write_json(name, {"temperatures": list(TEMPERATURES), "relative_slope_per_K": RELATIVE_SLOPE,
                      "reference_mesh": list(MESH), "points_per_temperature": n_points, "cases": records})


if __name__ == "__main__":
    main()
