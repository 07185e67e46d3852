"""Acceptance of properties with error bars (issue 23, part 4) on the nickel demo fit.

The fit: `ase-tds demo --out DIR` (EMT nickel, 5 shells, 1500 points at 300 K, quantum, all orders, 0.3 % noise),
or an existing demo folder (--fit DIR). Its θ̂ and Σ give phonopy's C_v(T), S(T), F(T) and the ADPs U_ij at 300 K
(`ase_tds.properties.phonon_properties`), with 1σ by linear propagation and by an ensemble of --members θ drawn from
N(θ̂, Σ). The truth: the EMT force constants the demo simulates from, on the same meshes. Pass:
- heat capacity and ADPs (and S, F): every |value − truth| ≤ 3σ (σ: the ensemble's);
- linear and ensemble 1σ of C_v and the ADPs agree to 10 % (where σ_linear ≥ 1 % of its largest);
- the 1σ propagated on the coarser propagation mesh agree with the linear 1σ on a finer one (the values' mesh for the
  thermal properties, twice the propagation mesh for the ADPs) to 10 %.

    python benchmarks/properties.py [--fit DIR] [--members 1000] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import nickel_model, write_json  # noqa: E402

NAMES = ("heat_capacity", "entropy", "free_energy", "adp", "adp_iso")


def demo_folder(folder: Path) -> Path:
    """`python -m ase_tds demo --out FOLDER`, as a user runs it."""
    command = [sys.executable, "-m", "ase_tds", "demo", "--out", str(folder)]
    print(" ".join(command))
    subprocess.run(command, check=True)
    return folder


def pulls(values, truth, sigma) -> float:
    """The largest |value − truth|/σ where σ > 1e-9 × its largest (U_ij off the diagonal of a cubic site are zero by
    symmetry, their σ rounding)."""
    values, truth, sigma = (np.ravel(a) for a in (values, truth, sigma))
    kept = sigma > 1e-9 * sigma.max()
    return float(np.abs((values[kept] - truth[kept]) / sigma[kept]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", type=Path, help="an `ase-tds demo` folder (default: run the demo into a temporary one)")
    parser.add_argument("--members", type=int, default=1000, help="ensemble members (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="200 members, no finer-mesh check of the 1σ")
    args = parser.parse_args()
    members = 200 if args.quick else args.members

    from ase_tds.properties import (PhonopyOfTheta, linear_sigma, phonon_properties, properties_of, read_fit_folder,
                                    thermal_properties, mesh_along_axes, PropertyCalculator)

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.fit or demo_folder(Path(scratch) / "demo")
        fit = read_fit_folder(folder)
        t0 = time.perf_counter()
        props = phonon_properties(fit.model, fit.covariance, fit.temperature, fit.statistics, ensemble=members,
                                  seed=0)
        wall = time.perf_counter() - t0

    truth = PhonopyOfTheta(nickel_model(5))
    true_values = properties_of(truth.at(truth.model.theta.detach().numpy().copy()), truth.model, props.mesh["mesh"],
                                props.temperatures, props.frequency_points, props.adp_temperature, props.statistics,
                                props.adp_mesh["points"])
    largest_pull = {name: pulls(props.values[name], true_values[name], props.sigma[name]) for name in NAMES}
    agreement = {name: props.agreement[name] for name in NAMES}

    mesh_check = {}
    if not args.quick:  # the 1σ on the propagation mesh against the linear 1σ on a finer one
        theta = fit.model.theta.detach().numpy().copy()
        phonopy = PhonopyOfTheta(fit.model)
        cell = fit.model.primitive.cell[:]
        fine = linear_sigma(lambda t: thermal_properties(phonopy.at(t), props.mesh["mesh"], props.temperatures),
                            theta, fit.covariance)
        finer_adp = PropertyCalculator(phonopy, props.temperatures[:1], props.adp_temperature, props.statistics,
                                       mesh_along_axes(cell, 8), 2 * props.adp_mesh["propagation_points"],
                                       props.frequency_points)
        fine_adp = linear_sigma(lambda t: {"adp_iso": finer_adp(t)["adp_iso"]}, theta, fit.covariance)
        fine.update(fine_adp)
        for name, sigma in fine.items():
            coarse, kept = np.ravel(props.sigma_linear[name]), np.ravel(sigma) >= 0.01 * np.max(sigma)
            mesh_check[name] = float(np.abs(coarse[kept] / np.ravel(sigma)[kept] - 1).max())

    at = {t: int(np.argmin(np.abs(props.temperatures - t))) for t in (50.0, 300.0, 1000.0)}
    table = {f"C_v({t:g} K)": (props.values["heat_capacity"][i], props.sigma_linear["heat_capacity"][i],
                               props.sigma_ensemble["heat_capacity"][i], true_values["heat_capacity"][i])
             for t, i in at.items()}
    table["U_iso (300 K)"] = (props.values["adp_iso"][0], props.sigma_linear["adp_iso"][0],
                              props.sigma_ensemble["adp_iso"][0], true_values["adp_iso"][0])
    print(f"\n{'':<16}{'fit':>14}{'1σ linear':>12}{'1σ ensemble':>13}{'truth':>14}{'pull':>8}")
    for name, (value, lin, ens, true) in table.items():
        print(f"{name:<16}{value:>14.7g}{lin:>12.3g}{ens:>13.3g}{true:>14.7g}{(value - true) / ens:>8.2f}")
    print("largest |pull|:", {k: round(v, 2) for k, v in largest_pull.items()})
    print("largest |σ_ensemble/σ_linear − 1|:", {k: round(v, 3) for k, v in agreement.items()})
    if mesh_check:
        print("largest |σ(propagation mesh)/σ(finer mesh) − 1|:", {k: round(v, 4) for k, v in mesh_check.items()})
    print(f"phonopy vs ThermalCovariance ADPs: {props.adp_check['largest_relative_difference']:.2g} (relative)")
    passed = (all(v <= 3 for v in largest_pull.values())
              and all(agreement[k] <= 0.10 for k in ("heat_capacity", "adp", "adp_iso"))
              and all(v <= 0.10 for v in mesh_check.values()))
    print(f"{members} members, {wall:.0f} s: {'PASS' if passed else 'FAIL'}")
    write_json("properties.json", {
        "fit": str(args.fit) if args.fit else "ase-tds demo (temporary folder)", "members": members,
        "wall_s": wall, "mesh": props.mesh, "adp_mesh": props.adp_mesh, "ensemble": props.ensemble,
        "largest_pull": largest_pull, "agreement": agreement, "sigma_mesh_check": mesh_check,
        "adp_check": props.adp_check["largest_relative_difference"],
        "table": {k: dict(zip(("fit", "sigma_linear", "sigma_ensemble", "truth"), map(float, v)))
                  for k, v in table.items()},
        "passed": passed})


if __name__ == "__main__":
    main()
