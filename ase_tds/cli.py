"""The `ase-tds` command: a thin layer over the Python API (DESIGN §7)."""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEMO_POINTS = 1500


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from .covariance import UnstableError
    from .data import TDSError
    from .structure import StructureError

    try:
        return args.run(args)
    except (StructureError, TDSError, UnstableError, FileNotFoundError, KeyError, ValueError) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"ase-tds: error: {message}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ase-tds", description="Fit force constants to X-ray thermal diffuse scattering.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(title="commands")

    demo = sub.add_parser("demo", help="nickel end to end: simulate from EMT, fit from a bad start, check recovery")
    demo.add_argument("--out", default="ase_tds_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--points", type=int, default=DEMO_POINTS, help="number of Q points (default: %(default)s)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    demo.set_defaults(run=_run_demo)

    fit = sub.add_parser("fit", help="fit force constants to a TDS data file")
    fit.add_argument("structure", help="structure file (any format ase.io.read reads) that the data's hkl index")
    fit.add_argument("data", help="HDF5 point list, NeXus NXdata volume or .npz")
    fit.add_argument("--out", required=True, help="output folder")
    group = fit.add_mutually_exclusive_group()
    group.add_argument("--shells", type=int, help="neighbour shells in the model (default 5)")
    group.add_argument("--cutoff", type=float, help="force-constant cutoff in Å")
    fit.add_argument("--temperature", type=float, help="K (overrides the file's)")
    fit.add_argument("--model", default="gaussian", choices=["one-phonon", "gaussian"], help="forward model")
    fit.add_argument("--statistics", default="quantum", choices=["classical", "quantum"])
    fit.add_argument("--scale", default="free", choices=["free", "fixed"])
    fit.add_argument("--background", default="free", choices=["free", "none"])
    fit.add_argument("--start", default="emt", help="emt | zero | a phonopy force-constant file")
    fit.add_argument("--reference", help="phonopy file drawn in dispersion.png for comparison")
    fit.add_argument("--bragg-radius", type=float, default=0.1, help="r.l.u. masked around Bragg peaks")
    fit.add_argument("--max-iter", type=int, default=200)
    fit.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    fit.set_defaults(run=_run_fit)
    return parser


def _device(name):
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here; use --device cpu")
    return torch.device(name)


def _run_demo(args) -> int:
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from .data import simulate
    from .fit import fit
    from .model import ForceConstantModel

    t0 = time.time()
    atoms = bulk("Ni", "fcc", a=3.52, cubic=True)
    print("ground truth: EMT nickel, phonopy finite displacements, projected on 5 neighbour shells")
    truth = ForceConstantModel(atoms, shells=5).set_from_calculator(EMT())
    rng = np.random.default_rng(2026)
    hkl = _points_in_sphere(truth, args.points, q_max=8.0, rng=rng)
    options = dict(grid=(9, 9, 9), dw_mesh=8)
    print(f"simulating {len(hkl)} points, |Q| ≤ 8 Å⁻¹, 300 K, quantum, all orders, Poisson noise 0.3 %")
    data = simulate(truth, hkl, 300.0, counts=1.1e5, rng=rng, tds_options=options)
    data = data.mask_bragg(0.1, truth.primitive.cell[:])
    start = copy.deepcopy(truth).set_from_bvk({k: 0.7 * v for k, v in truth.parameter_dict().items() if k.startswith("1")})
    print("start: nearest-neighbour constants only, scaled by 0.7")
    model = copy.deepcopy(start)
    model.to(_device(args.device))
    result = fit(model, data, scale="fixed", tds_options=options, max_iter=60)
    model.cpu()
    ok = _report_recovery(truth, start, model, result)
    _write_outputs(Path(args.out), model, result, data, options, start=start, reference=truth)
    print(f"wrote {args.out}/ in {time.time() - t0:.0f} s")
    return 0 if ok else 1


def _points_in_sphere(model, n, q_max, rng):
    """n random hkl of the model's cell with |Q| ≤ q_max (Å⁻¹)."""
    box = q_max * np.linalg.norm(model.unitcell.cell[:], axis=1) / (2 * np.pi)
    points = []
    while sum(len(p) for p in points) < n:
        hkl = rng.uniform(-box, box, size=(4 * n, 3))
        points.append(hkl[np.linalg.norm(model.q_from_hkl(hkl), axis=1) <= q_max])
    return np.concatenate(points)[:n]


def _report_recovery(truth, start, fitted, result) -> bool:
    true = truth.parameter_dict()
    print(f"\n{'label':<8}{'true':>10}{'start':>10}{'fitted':>10}{'1σ':>9}   eV/Å²")
    for i, (label, value) in enumerate(fitted.parameter_dict().items()):
        print(f"{label:<8}{true[label]:>10.4f}{start.parameter_dict()[label]:>10.4f}{value:>10.4f}{result.sigma[i]:>9.4f}")
    worst = max(abs(fitted.parameter_dict()[k] - v) for k, v in true.items()) / abs(true["1XX"])
    points = {"X": [1, 0, 0], "L": [0.5, 0.5, 0.5], "W": [1, 0.5, 0], "K": [0.75, 0.75, 0]}
    q = truth.q_from_hkl(list(points.values()))
    f_true, f_fit = truth.frequencies(q), fitted.frequencies(q)
    print(f"\n{'point':<6}{'true (THz)':>26}{'fitted (THz)':>26}")
    for i, name in enumerate(points):
        print(f"{name:<6}{np.array2string(f_true[i], precision=3):>26}{np.array2string(f_fit[i], precision=3):>26}")
    df = np.abs(f_fit - f_true).max()
    ok = worst <= 0.02 and df <= 0.05
    print(f"\nlargest parameter error {100 * worst:.2f} % of |1XX| (tolerance 2 %), "
          f"largest frequency error {df:.4f} THz (tolerance 0.05): {'recovered' if ok else 'NOT recovered'}")
    print(f"χ²_red {result.chi2_red:.3f} on {result.n_points} points after {result.iterations} iterations")
    return ok


def _run_fit(args) -> int:
    from ase.io import read

    from .data import TDSData
    from .fit import fit
    from .model import ForceConstantModel

    structure = read(args.structure)
    data = TDSData.read(args.data, structure=structure, temperature=args.temperature)
    kwargs = {"cutoff": args.cutoff} if args.cutoff else {"shells": args.shells or 5}
    start = _start_model(ForceConstantModel(structure, **kwargs), structure, args.start)
    model = copy.deepcopy(start)
    data = data.mask_bragg(args.bragg_radius, model.primitive.cell[:])
    model.to(_device(args.device))
    result = fit(model, data, temperature=args.temperature, method=args.model, statistics=args.statistics,
                 scale=args.scale, background=args.background, max_iter=args.max_iter)
    model.cpu()
    print(result.table())
    reference = None
    if args.reference:
        reference = copy.deepcopy(start).set_from_phonopy(args.reference)
    _write_outputs(Path(args.out), model, result, data, {}, start=start, reference=reference)
    print(f"wrote {args.out}/")
    return 0


def _start_model(fresh, structure, start):
    """`fresh` (a model with θ = 0) set from --start: emt | zero | a phonopy file."""
    if start == "zero":
        return fresh
    if start == "emt":
        from ase.calculators.emt import EMT, parameters

        missing = sorted(set(structure.get_chemical_symbols()) - set(parameters))
        if missing:
            raise ValueError(f"--start emt: ASE's EMT does not cover {missing}; use --start FILE (phonopy force constants)")
        return fresh.set_from_calculator(EMT())
    return fresh.set_from_phonopy(start)


def _write_outputs(out: Path, model, result, data, tds_options, start=None, reference=None) -> None:
    """Write every output into a temporary folder, then move the files into `out` (no half-written files)."""
    import torch

    from .io.phonopy import write_phonopy_files
    from .plot import plot_dispersion, plot_tds_fit
    from .tds import TDSModel

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ase_tds-", dir=out))
    try:
        write_phonopy_files(model, tmp)
        result.write_json(tmp / "fit.json")
        data.write(tmp / "data.h5")
        curves = {"fitted": model}
        if start is not None:
            curves["start"] = start
        if reference is not None:
            curves["reference"] = reference
        plot_dispersion(curves, tmp / "dispersion.png")
        settings = result.settings
        tds = TDSModel(model, settings["temperature"], method=settings["method"], statistics=settings["statistics"],
                       **tds_options)
        used = np.asarray(data.mask, dtype=bool)
        with torch.no_grad():
            calc = result.scale * tds(data.q[used]).numpy() + result.background
        sigma = data.sigma[used] if data.sigma is not None else np.sqrt(np.abs(data.intensity[used]))
        plot_tds_fit(data.q_norm[used], data.intensity[used], calc, sigma, tmp / "tds_fit.png")
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
