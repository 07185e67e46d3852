"""Acceptance runs of the inversion (issue 4): the paper's nickel benchmark, one JSON record per case.

Ground truth: EMT nickel (ASE's EMT, phonopy finite displacements) projected on 5 neighbour shells (16
parameters). Start: the nearest-neighbour constants only, × 0.7 (the `ase-tds demo` start: far off, stable).
Data: ~10⁴ hkl of the conventional cubic cell with |Q| ≤ 8 Å⁻¹, simulated with the gaussian (all-orders) model,
quantum statistics at 300 K (grid 9³, dw_mesh 8), Poisson noise of 0.3 % at the mean intensity (1.1·10⁵
counts), Bragg neighbourhoods (0.1 r.l.u.) masked. The fits use the same TDS options as the simulation.

Cases (all with a free constant background):
- gaussian_scale_fixed: absolute data (e.u./atom), scale fixed, random points in the |Q| ≤ 8 Å⁻¹ ball;
- gaussian_scale_free:  the same points in arbitrary units (× 250, + 40), scale free;
- gaussian_slice_hk0:   one (h k 0) plane only (random points of the disc), arbitrary units, scale free. A mirror
  plane: every Q and every q = Q − G lie in it, so the z-polarised modes are invisible to the one-phonon term
  and some θ combinations are pinned only by the Debye–Waller and multi-phonon terms, which takes many points:
  10⁴ miss (3 % of 1XX, 0.21 THz), 1.6·10⁵ (`--points 160000`, a detector slice's worth) pass (0.28 %, 0.017 THz);
- gaussian_slice_hk¼:   one (h k ¼) plane, otherwise the same: off the mirror planes, one slice pins all 16;
- sampling:             the published Monte-Carlo model (QSpaceSampler, quantum, a fixed seed: common random
  numbers), fitted by L-BFGS (the seeded loss is deterministic). The model is built on the primitive cell, and the
  sampler's supercell is L×L×L primitive cells, so that its exact expectation is the gaussian model of the same
  periodic supercell (dw_mesh="grid", grid=L³; tests/test_sampling.py checks the two agree): the data come from
  that, on Q of the supercell's grid (hkl ∈ Z³/L, primitive r.l.u.), so the run tests the sampling fit itself.
  Against data of the infinite crystal the supercell's missing long waves bias θ: its mean-square displacement is
  reported against the converged one (`msd_supercell_over_converged`). The Monte-Carlo error dominates, and it
  is not independent per point: every Q = G + q with one q of the supercell sees the same sampled modes, so
  under common random numbers the fit can match the fixed samples' speckle by moving θ, and it ends several
  of its (independent-error) 1σ away — what the fit warns of. More points add no independent Monte-Carlo
  information, more samples do: 64 samples × 7947 points missed (10 % of 1XX, 0.47 THz, pulls ≤ 9); 512 samples ×
  1500 points (≈ 7 per q) give 1.05 % and 0.036 THz (pulls ≤ 1.4), 1024 samples 1.82 % and 0.070 THz (pulls ≤
  2.6): θ within the gaussian cases' 2 %, ν at the Monte-Carlo noise of 0.05 THz. The issue allows sampling a
  looser tolerance: 5 % and 0.10 THz.

Per case: wall time of the fit, iterations, χ²_red, max |Δθ|/|θ_1XX| and max |Δν| over all branches at X, L, W, K
(THz), pass/fail against 2 % and 0.05 THz (sampling: 5 % and 0.10 THz).

    python benchmarks/fit_acceptance.py                       # all cases → results/fit_acceptance.json
    python benchmarks/fit_acceptance.py --cases sampling      # some of them
    python benchmarks/fit_acceptance.py --quick               # smoke test, minutes → results/fit_acceptance_quick.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import T_ROOM, earlier_record, machine, nickel_model, write_json  # noqa: E402

CASES = ("gaussian_scale_fixed", "gaussian_scale_free", "gaussian_slice_hk0", "gaussian_slice_hk¼", "sampling")
SLICES = {"gaussian_slice_hk0": 0.0, "gaussian_slice_hk¼": 0.25}  # l of the plane
OPTIONS = dict(grid=(9, 9, 9), dw_mesh=8)
Q_MAX = 8.0  # Å⁻¹
COUNTS = 1.1e5  # at the mean intensity: 1/√counts = 0.3 %
BRAGG_RADIUS = 0.1  # r.l.u.
ARBITRARY = (250.0, 40.0)  # scale, background of the arbitrary-unit data
TOLERANCE = {"gaussian": (0.02, 0.05), "sampling": (0.05, 0.10)}  # (of |θ_1XX|, THz); sampling: looser (the issue)
SPECIAL_POINTS = {"X": [1, 0, 0], "L": [0.5, 0.5, 0.5], "W": [1, 0.5, 0], "K": [0.75, 0.75, 0]}  # conventional r.l.u.
FULL = dict(points=10000, max_iter=200, supercell=6, sampling_points=1500, samples=512, sampling_iter=60)
QUICK = dict(points=1500, max_iter=60, supercell=4, sampling_points=600, samples=8, sampling_iter=8)


def points_in_ball(cell, n, rng) -> np.ndarray:
    """n random hkl (r.l.u. of `cell`) uniform in the ball |Q| ≤ Q_MAX."""
    box = Q_MAX * np.linalg.norm(cell, axis=1) / (2 * np.pi)
    hkl = rng.uniform(-box, box, size=(8 * n, 3))
    return hkl[np.linalg.norm(2 * np.pi * hkl @ np.linalg.inv(cell).T, axis=1) <= Q_MAX][:n]


def points_in_disc(cell, n, rng, l: float = 0.0) -> np.ndarray:
    """n random hkl in the plane of fixed l, uniform in the disc |Q| ≤ Q_MAX."""
    box = Q_MAX * np.linalg.norm(cell, axis=1)[:2] / (2 * np.pi)
    hkl = np.column_stack([rng.uniform(-box, box, size=(4 * n, 2)), np.full(4 * n, l)])
    return hkl[np.linalg.norm(2 * np.pi * hkl @ np.linalg.inv(cell).T, axis=1) <= Q_MAX][:n]


def points_on_grid(cell, repeat, n, rng) -> np.ndarray:
    """n random hkl ∈ Z³/repeat (what a repeat³ supercell supports) with |Q| ≤ Q_MAX."""
    top = int(np.ceil(Q_MAX * np.linalg.norm(cell, axis=1).max() / (2 * np.pi) * repeat))
    axis = np.arange(-top, top + 1) / repeat
    hkl = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    hkl = hkl[np.linalg.norm(2 * np.pi * hkl @ np.linalg.inv(cell).T, axis=1) <= Q_MAX]
    return hkl[rng.choice(len(hkl), min(n, len(hkl)), replace=False)]


def make_data(truth, hkl, seed, arbitrary: bool, options=OPTIONS):
    """Gaussian quantum 300 K data at hkl, Poisson noise, Bragg masked; in arbitrary units if asked."""
    from ase_tds import simulate

    data = simulate(truth, hkl, T_ROOM, counts=COUNTS, rng=np.random.default_rng(seed), tds_options=options)
    data = data.mask_bragg(BRAGG_RADIUS, truth.primitive.cell[:])
    if arbitrary:
        scale, background = ARBITRARY
        data = dataclasses.replace(data, intensity=scale * data.intensity + background, sigma=scale * data.sigma,
                                   units=None)
    return data


def primitive_nickel(truth):
    """The truth's θ on the 1-atom primitive cell (the sampling case's model: supercells of primitive cells)."""
    from ase.build import bulk

    from ase_tds.model import ForceConstantModel

    primitive = ForceConstantModel(bulk("Ni", "fcc", a=3.52), shells=5)
    assert primitive.labels == truth.labels, (primitive.labels, truth.labels)
    return primitive.set_from_bvk(truth.parameter_dict())


def bad_start(truth):
    """The nearest-neighbour constants of the truth × 0.7, every other shell zero."""
    start = copy.deepcopy(truth)
    return start.set_from_bvk({k: 0.7 * v for k, v in truth.parameter_dict().items() if k.startswith("1")})


def compare(truth, fitted) -> dict:
    """max |Δθ|/|θ_1XX| and max |Δν| (THz) over the branches at X, L, W, K."""
    true, got = truth.parameter_dict(), fitted.parameter_dict()
    theta_error = max(abs(got[k] - v) for k, v in true.items()) / abs(true["1XX"])
    q = truth.q_from_hkl(np.array(list(SPECIAL_POINTS.values()), dtype=float), cell=3.52 * np.eye(3))
    df = np.abs(fitted.frequencies(q) - truth.frequencies(q)).max(axis=1)
    return {"max_theta_error_rel_1XX": float(theta_error),
            "max_freq_error_THz": float(df.max()),
            "freq_error_THz": {name: float(d) for name, d in zip(SPECIAL_POINTS, df)},
            "theta_fitted": got, "theta_true": true}


def run_case(name, truth, data, sizes, progress) -> dict:
    from ase_tds import Optimizer, fit
    from ase_tds.covariance import ThermalCovariance
    from ase_tds.sampling import QSpaceSampler

    model = bad_start(truth)
    kind = "sampling" if name == "sampling" else "gaussian"
    scale = "fixed" if data.absolute else "free"
    extra = {}
    if kind == "sampling":
        repeat = sizes["supercell"]
        sampler = QSpaceSampler(model, (repeat,) * 3, T_ROOM, statistics="quantum", n_samples=sizes["samples"],
                                seed=0, progress=False)
        kwargs = dict(method="sampling", tds_options=dict(OPTIONS, sampler=sampler),
                      optimizer=Optimizer("lbfgs", max_iter=sizes["sampling_iter"]))
        reference = QSpaceSampler(truth, (repeat,) * 3, T_ROOM, statistics="quantum").mean_square_displacement()
        converged = ThermalCovariance(truth, T_ROOM, "quantum").converged_mean_square_displacement(OPTIONS["dw_mesh"])
        extra = {"supercell": [repeat] * 3, "atoms": sampler.n_atoms, "n_samples": sizes["samples"],
                 "msd_supercell_over_converged": float(reference[0, 0, 0].detach() / converged[0, 0, 0].detach())}
    else:
        kwargs = dict(method="gaussian", tds_options=OPTIONS, optimizer=Optimizer(max_iter=sizes["max_iter"]))
    start = compare(truth, model)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, data, statistics="quantum", scale=scale, background="free", progress=progress, **kwargs)
    seconds = time.perf_counter() - t0
    errors = compare(truth, model)
    theta_tol, freq_tol = TOLERANCE[kind]
    passed = errors["max_theta_error_rel_1XX"] <= theta_tol and errors["max_freq_error_THz"] <= freq_tol
    true = np.array(list(errors["theta_true"].values()))
    pulls = (np.array(list(errors["theta_fitted"].values())) - true) / result.sigma
    # what the data (and, for sampling, the Monte-Carlo error) allow: a failure with |pull| ≲ 3 and
    # max σ ≳ tolerance/2 is an information limit, not the optimiser's
    information = {"max_sigma_rel_1XX": float(result.sigma.max() / abs(errors["theta_true"]["1XX"])),
                   "max_abs_pull": float(np.abs(pulls).max())}
    record = {"method": kwargs["method"], "scale": scale, "background": "free", "n_points": result.n_points,
              "seconds": seconds, "iterations": result.iterations, "chi2_red": result.chi2_red,
              "scale_fitted": result.scale, "background_fitted": result.background,
              "start_max_theta_error_rel_1XX": start["max_theta_error_rel_1XX"],
              "start_max_freq_error_THz": start["max_freq_error_THz"],
              "tolerance": {"theta_rel_1XX": theta_tol, "freq_THz": freq_tol}, "passed": bool(passed),
              "sigma": dict(zip(result.labels, result.sigma.tolist())),
              "warnings": sorted({str(w.message) for w in caught}), **information, **errors, **extra}
    print(f"{name:<22} {record['n_points']:>6} pts {seconds:>8.1f} s {result.iterations:>4} it  "
          f"χ²_red {result.chi2_red:>7.3f}  max|Δθ|/|1XX| {100 * errors['max_theta_error_rel_1XX']:>6.2f} %  "
          f"max|Δν| {errors['max_freq_error_THz']:.4f} THz  {'PASS' if passed else 'FAIL'}  "
          f"(max 1σ {100 * information['max_sigma_rel_1XX']:.2f} %, max |pull| {information['max_abs_pull']:.1f})",
          flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--progress", action="store_true", help="show the optimiser's progress bar")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value} (quick {QUICK[key]})")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else (QUICK if args.quick else FULL)[k] for k in FULL}

    print(machine())
    t0 = time.perf_counter()
    truth = nickel_model(5)
    cell = np.array(truth.unitcell.cell[:])
    print(f"truth: EMT Ni, {truth.n_params} parameters, built in {time.perf_counter() - t0:.1f} s; sizes {sizes}")
    rng = np.random.default_rng(2026)
    records, datasets = {}, {}
    for name in cases:
        t0 = time.perf_counter()
        if name in ("gaussian_scale_fixed", "gaussian_scale_free"):
            if "ball" not in datasets:
                datasets["ball"] = make_data(truth, points_in_ball(cell, sizes["points"], rng), 1, arbitrary=False)
            data = datasets["ball"]
            if name == "gaussian_scale_free":
                scale, background = ARBITRARY
                data = dataclasses.replace(data, intensity=scale * data.intensity + background,
                                           sigma=scale * data.sigma, units=None)
        elif name in SLICES:
            l = SLICES[name]
            data = make_data(truth, points_in_disc(cell, sizes["points"], rng, l), 2, arbitrary=True)
            data = data.slice(normal=(0, 0, 1), offset=l)
        else:
            L = sizes["supercell"]
            primitive = primitive_nickel(truth)
            hkl = points_on_grid(primitive.unitcell.cell[:], L, sizes["sampling_points"], rng)
            data = make_data(primitive, hkl, 3, arbitrary=False, options=dict(grid=(L, L, L), dw_mesh="grid"))
        simulate_seconds = time.perf_counter() - t0
        model_truth = primitive if name == "sampling" else truth
        records[name] = run_case(name, model_truth, data, sizes, args.progress)
        records[name]["simulate_seconds"] = simulate_seconds
    summary = {name: r["passed"] for name, r in records.items()}
    print("passed:", summary)
    name = "fit_acceptance_quick.json" if args.quick else "fit_acceptance.json"
    kept = earlier_record(name)  # a run of some cases keeps the other cases' earlier records
    records = {**kept.get("cases", {}), **records}
    summary = {**kept.get("passed", {}), **summary}
    write_json(name,
               {"args": vars(args), "sizes": sizes, "settings": {
                   "truth": "EMT Ni, phonopy finite displacements, projected on 5 shells", "start": "0.7 × shell 1 only",
                   "temperature_K": T_ROOM, "statistics": "quantum", "tds_options": OPTIONS, "q_max": Q_MAX,
                   "counts_at_mean": COUNTS, "bragg_radius_rlu": BRAGG_RADIUS, "arbitrary_units": ARBITRARY,
                   "special_points_rlu": SPECIAL_POINTS, "tolerance": TOLERANCE},
                "cases": records, "passed": summary})


if __name__ == "__main__":
    main()
