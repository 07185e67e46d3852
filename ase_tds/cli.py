"""The `ase-tds` command: a thin layer over the Python API (docs/data-format.md)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DEMO_POINTS = 1500
NOT_CONVERGED = 3  # exit code of a fit that stopped without converging (iteration limit, stall)
SAMPLES = 64  # thermal configurations per evaluation of the sampling model (the samplers' default)
FIT_SEED = 0  # the sampling model's seed in a fit: fixed noise, a smooth loss (common random numbers)


def main(argv=None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # torchrun --nproc-per-node N -m ase_tds -- fit ...: the `--` that kept torchrun off
        argv = argv[1:]
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from .covariance import UnstableError
    from .data import TDSError
    from .structure import StructureError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            _check_out(args)
            return args.run(args)
    except (StructureError, TDSError, UnstableError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError, KeyError, ValueError) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"ase-tds: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
    # Ctrl-C, said here: after the except clause the interrupted work is released and its progress bar closed
    print(f"ase-tds: interrupted; {_left_behind(args)}", file=sys.stderr)
    return 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, as errors are."""
    print(f"ase-tds: warning: {message}", file=sys.stderr)


def _check_out(args) -> None:
    """Refuse an --out that cannot be written, before any work: a file in an existing folder for simulate and
    export, a folder (existing or to be made) for demo, fit and plot."""
    if args.out is None:
        return
    out = Path(args.out)
    if args.out_kind == "file":
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a folder; give a file name")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--out {out}: no such folder {out.parent}; create it first")
        return
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"--out {out}: {existing} is a file, not a folder; give a new or existing folder")


def _left_behind(args) -> str:
    """What an interrupted command leaves: a fit's checkpoint to resume from, else nothing (outputs are written
    whole at the end)."""
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and Path(checkpoint).is_file():
        return f"the fit so far is saved in {checkpoint}: run the same command again to resume from it"
    return "nothing was written" + (" (give --checkpoint FILE to be able to resume a fit)"
                                    if args.run is _run_fit else "")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ase-tds", description="Fit force constants to X-ray thermal diffuse scattering.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(title="commands")

    demo = sub.add_parser("demo", help="nickel end to end: simulate from EMT, fit from a bad start, check recovery")
    demo.add_argument("--out", default="ase_tds_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--points", type=int, default=DEMO_POINTS, help="number of Q points (default: %(default)s)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    _add_accuracy_argument(demo)
    demo.set_defaults(run=_run_demo, out_kind="folder")

    fit = sub.add_parser("fit", help="fit force constants to a TDS data file",
                         description="Fit force constants to a TDS data file. Exit code 0: converged; 3: stopped "
                                     "without converging (iteration limit or a stall; the best θ is still written "
                                     "and fit.json's status says why); 2: bad input.")
    fit.add_argument("structure", help="structure file (any format ase.io.read reads) that the data's hkl index")
    fit.add_argument("data", help="HDF5 point list, NeXus NXdata volume or .npz")
    fit.add_argument("--out", required=True, help="output folder")
    group = fit.add_mutually_exclusive_group()
    group.add_argument("--shells", type=int, help="neighbour shells in the model (default 5)")
    group.add_argument("--cutoff", type=float, help="force-constant cutoff in Å")
    fit.add_argument("--temperature", type=float, help="K (overrides the file's)")
    fit.add_argument("--model", default="gaussian", choices=["one-phonon", "gaussian", "sampling"],
                     help="forward model: one-phonon, gaussian (all orders, exact for a harmonic crystal) or "
                          "sampling (Monte Carlo on a periodic supercell, fitted by Adam unless --optimizer lbfgs; "
                          "see --samples) (default: %(default)s)")
    fit.add_argument("--optimizer", choices=["lbfgs", "adam"],
                     help="default: lbfgs, adam for --model sampling (whose loss is deterministic with its fixed "
                          "--seed, so lbfgs converges in fewer evaluations there too)")
    fit.add_argument("--statistics", default="quantum", choices=["classical", "quantum"],
                     help="phonon occupations (default: %(default)s)")
    fit.add_argument("--scale", choices=["free", "fixed"],
                     help="intensity scale: free, or fixed to 1 for data in e.u./atom (default: fixed when the data "
                          "file's units are e.u./atom, else free)")
    fit.add_argument("--background", default="free", choices=["free", "none"],
                     help="a constant background in data units, free or none (default: %(default)s)")
    fit.add_argument("--compton", action="store_true",
                     help="also fit the incoherent (Compton) scattering: Hubbell's S(|Q|) of the crystal's atoms "
                          "(e.u./atom) times a free amplitude (1 = all of it, for data in e.u./atom)")
    fit.add_argument("--loss", default="chi2", choices=["chi2", "poisson"],
                     help="chi2: Σ((model − I)/σ)²; poisson: the Poisson deviance of the counts n = t·I, the "
                          "exposure t (counts per unit of intensity) inferred per point as I/σ², so the data "
                          "need intensities ≥ 0 and σ = √n/t (default: %(default)s)")
    fit.add_argument("--checkpoint", metavar="FILE",
                     help="JSON file rewritten after every iteration; if it exists, the fit resumes from it "
                          "(same model and settings; --max-iter counts the iterations before it too)")
    fit.add_argument("--start", default="emt",
                     help="starting force constants: emt (ASE's EMT, a few metals), springs (central springs "
                          "between all pairs within the cutoff, stable, scaled to --debye-temperature: any crystal), "
                          "calculator:module.Class (any importable ASE calculator built with no arguments, e.g. a "
                          "machine-learned potential, by finite displacements), a phonopy file, or zero "
                          "(default: %(default)s)")
    fit.add_argument("--debye-temperature", type=float,
                     help="K, the Debye temperature that --start springs is scaled to (default: the one of 100–1600 K "
                          "whose springs fit the data best)")
    fit.add_argument("--bin", type=int, default=1, metavar="K",
                     help="NeXus volumes: average K×K×K voxels into one point (σ propagated), for a look at the data: "
                          "the model is evaluated at the block's mean hkl, which near Bragg peaks is far from the "
                          "block's mean intensity, so a binned fit is biased (default: %(default)s, every measured "
                          "voxel)")
    fit.add_argument("--prior-sigma", type=float, metavar="EV_PER_A2",
                     help="a ridge towards the start: each force constant gets a prior of this width (eV/Å²), so "
                          "that combinations the data do not determine (named by the fit, drawn in "
                          "identifiability.png) stay near the start while the rest converge (default: none)")
    fit.add_argument("--reference", help="phonopy file drawn (as it is) in dispersion.png for comparison")
    fit.add_argument("--bragg-radius", type=float, default=0.1, help="r.l.u. masked around Bragg peaks")
    fit.add_argument("--max-iter", type=int, default=200, help="iterations of the optimiser (default: %(default)s)")
    fit.add_argument("--first-fit-points", type=int, default=100_000, metavar="N",
                     help="data of more than 2N points are first fitted on a random subset of N, then on all of "
                          "them from there (the result is the fit of all the points); 0: all points from the start "
                          "(default: %(default)s)")
    fit.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    _add_accuracy_argument(fit)
    _add_sampling_arguments(fit, "the structure's cell",
                            f"seed of the sampling model's displacements, fixed so that the loss is a smooth "
                            f"function of the force constants (common random numbers) (default: {FIT_SEED})")
    fit.set_defaults(run=_run_fit, out_kind="folder")

    sim = sub.add_parser("simulate", help="TDS intensities from phonopy force constants (used as they are)",
                         description="Diffuse intensities in e.u./atom at the hkl of a file, from force constants "
                                     "used as they are (not projected); written as an HDF5 point list (docs/data-format.md).")
    sim.add_argument("structure", help="structure file whose cell the hkl index (same lattice and orientation as the "
                                       "force constants' crystal)")
    sim.add_argument("--fc", required=True, help="phonopy.load-able file, or a folder holding phonopy_params.yaml")
    sim.add_argument("--hkl", required=True, help="HDF5 point list or .npz (its hkl), .npy or text file of hkl rows")
    sim.add_argument("--temperature", type=float, required=True, help="K")
    sim.add_argument("--model", default="gaussian", choices=["one-phonon", "gaussian", "sampling"],
                     help="forward model (default: %(default)s); sampling takes the force constants into a "
                          "symmetry-adapted model as `ase-tds export` does (exact for files ase_tds wrote) and "
                          "writes its Monte-Carlo standard error as σ")
    sim.add_argument("--statistics", default="quantum", choices=["classical", "quantum"],
                     help="phonon occupations (default: %(default)s)")
    sim.add_argument("--counts", type=float, help="Poisson noise: counts at the mean intensity (default: none)")
    sim.add_argument("--out", required=True, help="output HDF5 file")
    sim.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    _add_accuracy_argument(sim)
    _add_sampling_arguments(sim, "the force constants' unit cell",
                            "random seed of the Poisson noise and of the sampling model's displacements "
                            "(default: fresh randomness)", seed_outside=True)
    sim.set_defaults(run=_run_simulate, out_kind="file")

    export = sub.add_parser("export", help="MLIP training data: thermal configurations with harmonic energies and forces",
                            description="Thermal configurations of a supercell drawn from the fitted force constants "
                                        "(Cholesky sampler), with E = ½uᵀΦu (eV) and F = −Φu (eV/Å), as extxyz.")
    export.add_argument("source", help="output folder of `ase-tds fit`/`demo`, or a phonopy.load-able file")
    export.add_argument("--supercell", type=int, nargs=3, required=True, metavar=("A", "B", "C"),
                        help="repetitions of the unit cell")
    export.add_argument("--temperature", type=float, required=True, help="K")
    export.add_argument("--samples", type=int, required=True, help="number of configurations")
    export.add_argument("--out", required=True, help="output file, e.g. train.extxyz")
    export.add_argument("--statistics", default="classical", choices=["classical", "quantum"])
    export.add_argument("--seed", type=int, help="random seed")
    export.add_argument("--energy-key", default="REF_energy", help="info key of the energy (default: %(default)s)")
    export.add_argument("--forces-key", default="REF_forces", help="array key of the forces (default: %(default)s)")
    export.add_argument("--no-plain", action="store_true", help="do not also write plain energy/forces")
    export.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    export.set_defaults(run=_run_export, out_kind="file")

    plot = sub.add_parser("plot", help="phonon dispersions of force-constant files, and a fit folder's TDS fit",
                          description="Draw the phonon dispersions of one or more force-constant sources (as they are) "
                                      "on the standard path of the first, into OUT/dispersion.png; when the first is an "
                                      "`ase-tds fit`/`demo` folder, also redraw OUT/tds_fit.png and OUT/identifiability.png from its data.h5 "
                                      "and fit.json, and shade the fit's ±1σ band of frequencies.")
    plot.add_argument("sources", nargs="+", metavar="SOURCE",
                      help="output folder of `ase-tds fit`/`demo`, or a phonopy.load-able file")
    plot.add_argument("--label", nargs="+", action="extend",
                      help="legend names, one per SOURCE in order: --label a b or --label a --label b "
                           "(default: the SOURCE as typed)")
    plot.add_argument("--out", help="output folder, made if missing (default: the first SOURCE if a folder, else "
                                    "the current folder)")
    plot.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    plot.set_defaults(run=_run_plot, out_kind="folder")
    return parser


def _add_accuracy_argument(parser) -> None:
    parser.add_argument("--accuracy", type=float,
                        help="relative error of the gaussian (all-order) model that its grid is chosen for: the "
                             "intensities change by less than this on a grid 1.5× larger (default: 1e-3); "
                             "--grid L1 L2 L3 sets the grid instead")
    parser.add_argument("--grid", type=int, nargs=3, metavar=("L1", "L2", "L3"),
                        help="the gaussian model's periodic crystal, in primitive cells (default: chosen for --accuracy)")


def _accuracy_options(args) -> dict:
    """TDSModel options from --accuracy / --grid."""
    if args.accuracy is None:
        return {"grid": tuple(args.grid) if args.grid else None}
    if not (0 < args.accuracy < 1):
        raise ValueError(f"--accuracy must be a relative error between 0 and 1, e.g. 1e-3; got {args.accuracy}")
    if args.grid is not None and min(args.grid) < 1:
        raise ValueError(f"--grid needs three positive numbers of primitive cells, got {args.grid}")
    return {"accuracy": args.accuracy, "grid": tuple(args.grid) if args.grid else None}


def _add_sampling_arguments(parser, cell: str, seed_help: str, seed_outside: bool = False) -> None:
    """--samples, --supercell (repetitions of `cell`) and --seed of the sampling model."""
    group = parser.add_argument_group("sampling model (--model sampling)")
    group.add_argument("--samples", type=int, metavar="N",
                       help=f"thermal configurations per evaluation; the Monte-Carlo error falls as 1/√N "
                            f"(default: {SAMPLES})")
    group.add_argument("--supercell", type=int, nargs=3, metavar=("A", "B", "C"),
                       help=f"repetitions of {cell} in the periodic supercell sampled; it sees only Q with hkl·L "
                            "integer (default: the smallest one holding every Q and the force-constant cutoff)")
    (parser if seed_outside else group).add_argument("--seed", type=int, help=seed_help)


def _check_sampling_arguments(args, seed_is_sampling: bool) -> None:
    """Refuse --samples/--supercell (and, where they seed only the sampler, --seed) without --model sampling, and
    values the sampling model cannot use; before anything is read."""
    given = [name for name, value in (("--samples", args.samples), ("--supercell", args.supercell),
                                      ("--seed", args.seed if seed_is_sampling else None)) if value is not None]
    if args.model != "sampling":
        if given:
            raise ValueError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} the sampling model; "
                             f"add --model sampling, or leave {'it' if len(given) == 1 else 'them'} out")
        return
    if args.samples is not None and args.samples < 2:
        raise ValueError(f"--samples {args.samples}: the sampling model needs N ≥ 2 thermal configurations per "
                         f"evaluation (its standard error); e.g. --samples {SAMPLES}")
    if args.supercell is not None and min(args.supercell) < 1:
        raise ValueError(f"--supercell {' '.join(map(str, args.supercell))}: give three positive repetitions A B C "
                         "of the unit cell, e.g. --supercell 4 4 4")


def _sampler(model, supercell, n_samples, seed, temperature, statistics, q, verbose=True):
    """The q-space sampler of the sampling model on `model` (a ForceConstantModel) for Cartesian Q (N, 3) Å⁻¹:
    `supercell` repetitions of model.unitcell (None: `sampling.commensurate_supercell`), checked against every Q;
    verbose: say which (and warn when the supercell is shorter than the cutoff needs)."""
    from .sampling import QSpaceSampler, commensurate_supercell
    from .structure import holds_cutoff

    q = np.asarray(q, dtype=float).reshape(-1, 3)
    supercell = commensurate_supercell(model, q) if supercell is None else tuple(supercell)
    sampler = QSpaceSampler(model, supercell, temperature, statistics, n_samples=n_samples, seed=seed,
                            progress=False)
    sampler.check_q(q)
    if not verbose:
        return sampler
    print(f"sampling model: {sampler!r}, {n_samples} samples per evaluation, seed {seed}")
    if not holds_cutoff(sampler.cell, model.cutoff):
        print(f"ase-tds: warning: the {'×'.join(map(str, supercell))} supercell is shorter than twice the "
              f"force-constant cutoff ({2 * model.cutoff:.3f} Å): longer pairs wrap around it", file=sys.stderr)
    return sampler


def _device(name):
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here; use --device cpu")
    return torch.device(name)


def _run_demo(args) -> int:
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from .data import points_in_sphere, simulate
    from .fit import Optimizer, fit
    from .model import ForceConstantModel

    t0 = time.time()
    atoms = bulk("Ni", "fcc", a=3.52, cubic=True)
    print("ground truth: EMT nickel, phonopy finite displacements, projected on 5 neighbour shells")
    truth = ForceConstantModel(atoms, shells=5).set_from_calculator(EMT())
    rng = np.random.default_rng(2026)
    hkl = points_in_sphere(truth, args.points, q_max=8.0, rng=rng)
    options = _accuracy_options(args)
    print(f"simulating {len(hkl)} points, |Q| ≤ 8 Å⁻¹, 300 K, quantum, all orders, Poisson noise 0.3 %")
    data = simulate(truth, hkl, 300.0, counts=1.1e5, rng=rng, tds_options=options)
    data = data.mask_bragg(0.1, truth.primitive.cell[:])
    start = copy.deepcopy(truth).set_from_bvk({k: 0.7 * v for k, v in truth.parameter_dict().items() if k.startswith("1")})
    print("start: nearest-neighbour constants only, scaled by 0.7")
    model = copy.deepcopy(start)
    model.to(_device(args.device))
    result = fit(model, data, tds_options=options, optimizer=Optimizer(max_iter=60))
    model.cpu()
    ok = _report_recovery(truth, start, model, result)
    result.save(args.out, model, data, start=start, reference=truth)
    print(f"wrote {args.out}/ in {time.time() - t0:.0f} s")
    return 0 if ok else 1


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
    """The fit command; under torchrun its points are sharded over the ranks (`ase_tds.distributed`) and rank 0
    alone prints and writes."""
    from . import distributed

    distributed.start(args.device)
    try:
        if not distributed.is_main():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                return _fit_command(args)
        return _fit_command(args)
    finally:
        distributed.stop()


def _fit_command(args) -> int:
    from . import distributed
    from .data import TDSData
    from .fit import Optimizer, fit
    from .model import ForceConstantModel
    from .phonopy_source import PhonopyForceConstants

    if args.shells is not None and args.shells < 1:
        raise ValueError(f"--shells {args.shells}: give a positive number of neighbour shells, e.g. --shells 5")
    if args.cutoff is not None and not 0 < args.cutoff < np.inf:
        raise ValueError(f"--cutoff {args.cutoff:g}: give a positive force-constant cutoff in Å, e.g. --cutoff 5.8, "
                         "or --shells N")
    if args.prior_sigma is not None and not 0 < args.prior_sigma < np.inf:
        raise ValueError(f"--prior-sigma {args.prior_sigma:g}: give a positive width in eV/Å², e.g. --prior-sigma 0.05")
    _check_sampling_arguments(args, seed_is_sampling=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is not None and checkpoint.is_dir():
        raise IsADirectoryError(f"--checkpoint {checkpoint} is a folder; give a file name, e.g. "
                                f"{checkpoint / 'fit.ckpt'}")
    if checkpoint is not None and not checkpoint.parent.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such folder {checkpoint.parent}; create it first")
    structure = _read_structure(args.structure)
    data = TDSData.read(args.data, structure=structure, temperature=args.temperature, bin=args.bin)
    temperature = data.require_temperature(args.temperature)
    reference = PhonopyForceConstants(args.reference) if args.reference else None
    if reference is not None:
        _check_same_lattice(structure, args.structure, reference, args.reference)
    shells = 5 if args.shells is None and args.cutoff is None else args.shells
    fresh = ForceConstantModel(structure, shells=shells, cutoff=args.cutoff)
    data = data.mask_bragg(args.bragg_radius, fresh.primitive.cell[:])
    if args.loss == "poisson":  # what fit() would refuse, before the (EMT) start
        if data.sigma is None:
            raise ValueError(f"--loss poisson needs the counts: {args.data} has no sigma, from which the exposure "
                             "(counts per unit of intensity, I/σ²) is inferred; write σ = √n/exposure into the "
                             "file, or use --loss chi2")
        negative = int((data.intensity[data.mask] < 0).sum())
        if negative:
            raise ValueError(f"--loss poisson needs intensities ≥ 0 (counts/exposure): {negative} used points of "
                             f"{args.data} are negative; use --loss chi2 for background-subtracted data")
    sampling = {"n_samples": args.samples or SAMPLES, "seed": FIT_SEED if args.seed is None else args.seed,
                "temperature": temperature, "statistics": args.statistics, "q": data.q[data.mask]}
    if args.model == "sampling":  # refuse a supercell the data do not fit before the (EMT) start
        sampling["supercell"] = _sampler(fresh, args.supercell, **sampling, verbose=False).supercell
    if args.start == "springs" and args.debye_temperature is None:
        from .fit import DEBYE_CANDIDATES, debye_temperature_from_data

        chosen = debye_temperature_from_data(fresh, data, temperature, args.statistics)
        print(f"start: springs at a Debye temperature of {chosen:.0f} K, the best of {len(DEBYE_CANDIDATES)} "
              f"({DEBYE_CANDIDATES[0]:.0f}–{DEBYE_CANDIDATES[-1]:.0f} K) on the data")
        start = fresh
    else:
        start = _start_model(fresh, structure, args.start, args.debye_temperature or 300.0)
    model = copy.deepcopy(start)
    model.to(_device(args.device))
    options = {"sampler": _sampler(model, **sampling)} if args.model == "sampling" else _accuracy_options(args)
    optimizer = Optimizer(args.optimizer, max_iter=args.max_iter, first_fit_points=args.first_fit_points or None)
    result = fit(model, data, temperature=temperature, method=args.model, statistics=args.statistics,
                 scale=args.scale, background=args.background, compton=args.compton, loss=args.loss,
                 checkpoint=checkpoint, tds_options=options, optimizer=optimizer, prior_sigma=args.prior_sigma)
    model.cpu()
    print(result.table())
    if distributed.is_main():
        result.save(args.out, model, data, start=start, reference=reference)
    print(f"wrote {args.out}/")
    if not result.status.get("converged", True):
        print(f"ase-tds: the fit did not converge ({result.status['reason']}); its best θ is written, and fit.json "
              "says so. Resume with --checkpoint and a larger --max-iter, or check the start", file=sys.stderr)
        return NOT_CONVERGED
    return 0


def _start_model(fresh, structure, start, debye_temperature: float = 300.0):
    """`fresh` (a model with θ = 0) set from --start: emt | springs | zero | calculator:module.Class | a phonopy
    file."""
    if start == "zero":
        return fresh
    if start == "springs":
        return fresh.set_from_springs(debye_temperature)
    if start == "emt":
        from ase.calculators.emt import EMT, parameters

        missing = sorted(set(structure.get_chemical_symbols()) - set(parameters))
        if missing:
            raise ValueError(f"--start emt: ASE's EMT does not cover {missing}; use --start calculator:module.Class "
                             "(any ASE calculator that does) or --start FILE (phonopy force constants)")
        return fresh.set_from_calculator(EMT())
    if start.startswith("calculator:"):
        return fresh.set_from_calculator(_calculator(start))
    return fresh.set_from_phonopy(start)


def _calculator(spec: str):
    """An ASE calculator from 'calculator:module.Class' (built with no arguments), e.g. a machine-learned potential."""
    import importlib

    path = spec.split(":", 1)[1]
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"--start {spec}: give calculator:module.Class, e.g. calculator:ase.calculators.emt.EMT")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--start {spec}: cannot import {class_name} from {module_name} ({err}); install the "
                         "package or check the name") from err
    try:
        return cls()
    except Exception as err:  # any constructor failure of a third-party calculator
        raise ValueError(f"--start {spec}: {class_name}() failed ({type(err).__name__}: {err}); a calculator that "
                         "needs arguments can be used from Python: model.set_from_calculator(calc)") from err


def _run_simulate(args) -> int:
    from .covariance import UnstableError
    from .data import simulate
    from .model import ForceConstantModel
    from .structure import reciprocal_q
    from .phonopy_source import PhonopyForceConstants

    _check_sampling_arguments(args, seed_is_sampling=False)
    structure = _read_structure(args.structure)
    # the sampling model needs a ForceConstantModel (its pairs on a supercell); the others use phonopy's as they are
    fc = ForceConstantModel.from_phonopy(args.fc) if args.model == "sampling" else PhonopyForceConstants(args.fc)
    _check_same_lattice(structure, args.structure, fc, args.fc)
    hkl = _read_hkl(Path(args.hkl), structure)
    fc.to(_device(args.device))
    options = _accuracy_options(args) if args.model == "gaussian" else {}
    if args.model == "sampling":
        options["sampler"] = _sampler(fc, args.supercell, args.samples or SAMPLES, args.seed, args.temperature,
                                      args.statistics, reciprocal_q(hkl, structure.cell[:]))
    try:
        data = simulate(fc, hkl, args.temperature, method=args.model, statistics=args.statistics,
                        cell=structure.cell[:], counts=args.counts, rng=args.seed, tds_options=options)
    except UnstableError as err:
        raise UnstableError(f"--fc {args.fc}: the force constants are dynamically unstable ({err}), so they have "
                            f"no thermal diffuse scattering; see their imaginary branches with `ase-tds plot "
                            f"{args.fc}`") from err
    data.write(args.out)
    error = ", σ = Monte-Carlo standard error" if args.model == "sampling" else ""
    print(f"wrote {len(data)} points ({args.model}, {args.statistics}, {args.temperature:g} K{error}) to {args.out}")
    return 0


def _check_same_lattice(structure, structure_name, fc, fc_name) -> None:
    """Refuse force constants whose lattice (or orientation) is not that of `structure`'s cell."""
    lattice = np.array(structure.cell[:]) @ np.linalg.inv(np.array(fc.primitive.cell[:]))
    if np.abs(lattice - np.round(lattice)).max() > 1e-3:
        raise ValueError(f"{structure_name}: its cell is not a lattice of the force constants' crystal in the same "
                         f"orientation (cell · inv(primitive cell of {fc_name}) = {np.round(lattice, 3).tolist()} is not "
                         "integer); give the structure the force constants were computed for")


def _read_structure(name):
    """The crystal (ase.Atoms) in the structure file `name`, or a one-line error naming the file and the fix."""
    from ase.io import read

    from .structure import StructureError

    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such structure file")
    if path.stat().st_size == 0:
        raise StructureError(f"{path}: the structure file is empty; give the crystal's structure, e.g. as CIF or "
                             "POSCAR")
    try:
        atoms = read(path)
    except Exception as err:  # ASE's readers fail in many ways
        reason = ": ".join(filter(None, (type(err).__name__, str(err))))
        raise StructureError(f"{path}: ASE could not read a structure from it ({reason}); give a structure file "
                             "ASE reads, e.g. CIF or POSCAR, with the format's usual name") from err
    if not atoms.pbc.all() or abs(atoms.cell.volume) < 1e-6:
        raise StructureError(f"{path}: holds no periodic 3D unit cell (pbc={atoms.pbc.tolist()}, cell volume "
                             f"{abs(atoms.cell.volume):.3g} Å³), as a molecule does; give a crystal with its unit "
                             "cell, e.g. as CIF or POSCAR")
    return atoms


def _read_hkl(path: Path, structure) -> np.ndarray:
    """hkl (N, 3) r.l.u. from a data file (HDF5 point list, NXdata, .npz), an .npy, or a text file of rows."""
    import h5py

    from .data import TDSData

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such hkl file")
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            hkl = f["hkl"][()] if "hkl" in f and "intensity" not in f else None
        if hkl is None:
            hkl = TDSData.read(path, structure=structure).hkl
    elif path.suffix == ".npz":
        hkl = TDSData.read(path, structure=structure).hkl
    else:
        try:
            hkl = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
        except ValueError as err:
            raise ValueError(f"{path}: not a table of numbers ({err}); give one 'h k l' row per point") from None
    hkl = np.asarray(hkl, dtype=float)
    if hkl.ndim != 2 or hkl.shape[1] != 3 or len(hkl) == 0:
        raise ValueError(f"{path}: hkl has shape {hkl.shape}; give N ≥ 1 rows of three numbers h k l, shape (N, 3)")
    if not np.isfinite(hkl).all():
        raise ValueError(f"{path}: hkl has NaN/inf values; give N ≥ 1 rows of three finite numbers h k l")
    return hkl


def _run_export(args) -> int:
    from .export import write_training_data

    path = write_training_data(args.source, args.out, args.supercell, args.temperature, args.samples,
                               statistics=args.statistics, seed=args.seed, energy_key=args.energy_key,
                               forces_key=args.forces_key, also_plain=not args.no_plain,
                               device=_device(args.device))
    print(f"wrote {args.samples} configurations of the {'×'.join(map(str, args.supercell))} supercell at "
          f"{args.temperature:g} K ({args.statistics}) to {path}")
    return 0


def _run_plot(args) -> int:
    from .data import TDSData
    from .fit import FitResult
    from .model import ForceConstantModel
    from .phonopy_source import PhonopyForceConstants
    from .atomic import write_files
    from .plot import plot_dispersion, plot_identifiability
    from .report import draw_tds_fit

    labels = args.label or args.sources
    if len(labels) != len(args.sources):
        raise ValueError(f"{len(labels)} --label for {len(args.sources)} SOURCE; give one per SOURCE, in order "
                         f"(--label {' '.join(f'NAME{i + 1}' for i in range(len(args.sources)))}), or none")
    if len(set(labels)) < len(labels):
        raise ValueError(f"the legend names {labels} repeat; give each SOURCE its own --label")
    first = Path(args.sources[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else Path("."))
    device = _device(args.device)
    models = {label: PhonopyForceConstants(source).to(device) for label, source in zip(labels, args.sources)}
    for model, source in zip(list(models.values())[1:], args.sources[1:]):  # one crystal: the first's path
        _check_same_lattice(models[labels[0]].unitcell, args.sources[0], model, source)
    covariance = None
    drawings = {"dispersion.png": lambda path: plot_dispersion(models, path, covariance=covariance)}
    if first.is_dir() and (first / "fit.json").is_file() and (first / "data.h5").is_file():
        fitted = models[labels[0]]
        result = FitResult.from_dict(json.loads((first / "fit.json").read_text()),
                                     symbols=fitted.primitive.get_chemical_symbols())
        symmetric = ForceConstantModel.from_phonopy(first).to(device)  # θ with the fit's labels: its 1σ band and its sampler
        if symmetric.labels == result.labels:
            models[labels[0]], covariance = symmetric, result.covariance
        if result.settings["method"] == "sampling":
            fitted = symmetric
        data = TDSData.read(first / "data.h5")
        drawings["tds_fit.png"] = lambda path: draw_tds_fit(fitted, result, data, path)
        if result.combinations:
            drawings["identifiability.png"] = lambda path: plot_identifiability(result.combinations, path)
    out.mkdir(parents=True, exist_ok=True)
    write_files(out, drawings)  # all drawn, or none written
    for name in drawings:
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
