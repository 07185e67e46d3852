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

from .cli_parser import DEMO_POINTS, FIT_SEED, SAMPLES, build_parser  # noqa: F401 (DEMO_POINTS: the demo's default)

NOT_CONVERGED = 3  # exit code of a fit that stopped without converging (iteration limit, stall)
NOT_TRUSTED = 4  # exit code of a fit whose model does not describe the data (its 1σ are not error bars)


def main(argv=None) -> int:
    """Run `ase-tds` with `argv` (default: sys.argv[1:]); its exit code (2: bad input, 130: interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = _parser()  # imports the package: Ctrl-C in these first seconds ends quietly too
        if argv[:1] == ["--"]:  # torchrun --nproc-per-node N -m ase_tds -- fit ...: the `--` that kept torchrun off
            argv = argv[1:]
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        print("ase-tds: interrupted; nothing was written", file=sys.stderr)
        return 130
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return _run(args)


def _run(args) -> int:
    """args.run(args), its bad input as one line naming the option and the fix (exit 2), Ctrl-C as exit 130."""
    try:
        from .covariance import UnstableError
        from .data import TDSError
        from .structure import StructureError

        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            _check_out(args)
            _check_numbers(args)
            if getattr(args, "checkpoint", None):
                _checkpoint_path(args)
            _device(args.device)
            return args.run(args)
    except (StructureError, TDSError, UnstableError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError, KeyError, ValueError) as err:
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


def _parser() -> argparse.ArgumentParser:
    """The argument parser, each command's `run` one of this module's functions."""
    return build_parser({"demo": _run_demo, "fit": _run_fit, "refine": _run_refine, "simulate": _run_simulate,
                         "export": _run_export, "plot": _run_plot, "properties": _run_properties})


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, as errors are."""
    print(f"ase-tds: warning: {message}", file=sys.stderr)


FIT_OUTPUTS = ("phonopy_params.yaml", "FORCE_CONSTANTS", "force_constants.hdf5", "fit.json", "data.h5",
               "dispersion.png", "identifiability.png", "tds_fit.png")  # what a fit (or demo) folder holds


def _inputs(args) -> dict[str, str]:
    """The command's input files and folders, by the option that names them."""
    names = {"STRUCTURE": "structure", "DATA": "data", "--fc": "fc", "--hkl": "hkl", "--born": "born",
             "--reference": "reference", "--start": "start", "SOURCE": "source"}
    return {option: getattr(args, name) for option, name in names.items() if getattr(args, name, None)}


def _check_out(args) -> None:
    """Refuse an --out that cannot be written, before any work: a file in an existing, writable folder for simulate
    and export, a folder (existing or to be made) for demo, fit and plot; an existing output unless --overwrite,
    and never one of the command's inputs."""
    if args.out is None:
        return
    out = Path(args.out)
    if args.out_kind == "file":
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a folder; give a file name")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--out {out}: no such folder {out.parent}; create it first")
        _check_writable("--out", out, out.parent)
        outputs = [out]
    else:
        existing = next(path for path in (out, *out.parents) if path.exists())
        if not existing.is_dir():
            raise NotADirectoryError(f"--out {out}: {existing} is a file, not a folder; give a new or existing folder")
        _check_writable("--out", out, existing)
        names = [name for name in FIT_OUTPUTS if name.endswith(".png")] if hasattr(args, "sources") else FIT_OUTPUTS
        outputs = [out / name for name in names]  # plot draws only the pictures
    for option, name in _inputs(args).items():
        path = Path(name).resolve()
        if path.exists() and any(path == output.resolve() for output in [out, *outputs]):
            raise ValueError(f"--out {out} would replace the command's input {option} {name}; write the output "
                             "elsewhere")
    if getattr(args, "overwrite", True) or _resuming(args):
        return
    replaced = [output for output in outputs if output.exists()]
    if replaced:
        what = f"{out} exists" if args.out_kind == "file" else f"{out} holds an earlier output ({replaced[0].name})"
        raise FileExistsError(f"--out {what}; give --overwrite to replace it, or another --out")


def _resuming(args) -> bool:
    """Whether a fit resumes from its --checkpoint (and so replaces its own earlier, unconverged output)."""
    checkpoint = getattr(args, "checkpoint", None)
    return checkpoint is not None and Path(checkpoint).is_file()


def _check_writable(option: str, path: Path, folder: Path) -> None:
    """Refuse `path` (named by `option`) when its existing `folder` cannot be written."""
    import os

    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: the folder {folder} is not writable; choose a writable location")


def _left_behind(args) -> str:
    """What an interrupted command leaves: a fit's checkpoint to resume from, else nothing (outputs are written
    whole at the end)."""
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and Path(checkpoint).is_file():
        return f"the fit so far is saved in {checkpoint}: run the same command again to resume from it"
    return "nothing was written" + (" (give --checkpoint FILE to be able to resume a fit)"
                                    if args.run is _run_fit else "")


def _accuracy_options(args) -> dict:
    """TDSModel options from --accuracy / --grid."""
    if args.grid is not None and min(args.grid) < 1:
        raise ValueError(f"--grid {' '.join(map(str, args.grid))}: give three positive numbers of primitive cells, "
                         "e.g. --grid 12 12 12")
    grid = tuple(args.grid) if args.grid else None
    if args.accuracy is None:
        return {"grid": grid}
    if not (0 < args.accuracy < 1):
        raise ValueError(f"--accuracy must be a relative error between 0 and 1, e.g. 1e-3; got {args.accuracy}")
    return {"accuracy": args.accuracy, "grid": grid}


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
    """The torch device of --device, refused (before any work) when torch does not know it or has none here."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s) here; give "
                         f"cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: ase_tds runs on cpu or cuda")
    return device


def _check_numbers(args) -> None:
    """Refuse counts and tolerances out of range before anything is read: the options that the API checks only once
    the data are read and the start is computed."""
    checks = (("points", 1, "number of Q points, e.g. --points 1500"),
              ("max_iter", 1, "number of iterations, e.g. --max-iter 200"),
              ("bin", 1, "number of voxels per block edge, e.g. --bin 2"),
              ("first_fit_points", 0, "number of points (0: all points from the start), e.g. --first-fit-points "
                                      "100000"))
    for name, least, what in checks:
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give a {'positive' if least else 'non-negative'} "
                             f"{what}")
    for name in ("debye_temperature", "counts"):
        value = getattr(args, name, None)
        if value is not None and not 0 < value < np.inf:
            raise ValueError(f"--{name.replace('_', '-')} {value:g}: give a positive, finite number")
    if hasattr(args, "mask_bragg"):
        _bragg_radius(args.mask_bragg)
    if hasattr(args, "accuracy"):
        _accuracy_options(args)


def _bragg_radius(text: str) -> tuple[float, str]:
    """(radius, units) of --mask-bragg: "0.1" or "0.1rlu" r.l.u., "0.05invA" Å⁻¹ (TDSData.mask_bragg's units)."""
    suffix = next((units for units in ("rlu", "invA") if text.endswith(units)), "")
    try:
        radius = float(text[: len(text) - len(suffix)])
    except ValueError:
        radius = None
    if radius is None or not 0 <= radius < np.inf:
        raise ValueError(f"--mask-bragg {text}: give a radius ≥ 0 in r.l.u. (e.g. 0.1), or in Å⁻¹ with the suffix "
                         "invA (e.g. 0.05invA); 0 masks nothing")
    return radius, suffix or "rlu"


def _run_demo(args) -> int:
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from .forward import points_in_sphere, simulate
    from .fitting import Optimizer, fit
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
    sys.stderr.flush()  # the fit's notes before the summary: the last line is the demo's verdict
    notes = (f"; {len(result.warnings)} note{'s' if len(result.warnings) > 1 else ''} of the fit above (also in "
             "fit.json)") if result.warnings else ""
    print(f"demo: wrote {args.out}/ in {time.time() - t0:.0f} s; the truth {'recovered' if ok else 'NOT recovered'}, "
          f"χ²_red {result.chi2_red:.3f}{notes}")
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
        if not distributed.is_main():  # rank 0 alone says the exit code (3, 4), once its files are written
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                _fit_command(args)
            return 0
        return _fit_command(args)
    finally:
        distributed.stop()


def _fit_command(args) -> int:
    from .data import TDSData
    from .fitting import Optimizer, StartContext, fit, set_start
    from .fitting.range import fit_range

    if args.more_data or args.series or args.smoothness is not None:  # a temperature series
        return _run_series(args)
    _check_sampling_arguments(args, seed_is_sampling=True)
    shells, cutoff = _range_arguments(args)
    if shells is None and cutoff is None and (args.model == "sampling" or args.checkpoint):
        raise ValueError(f"{'--model sampling' if args.model == 'sampling' else '--checkpoint'} needs a fixed range: "
                         "give --shells N or --cutoff Å (auto fits several models)")
    if args.prior_sigma is not None and not 0 < args.prior_sigma < np.inf:
        raise ValueError(f"--prior-sigma {args.prior_sigma:g}: give a positive width in eV/Å², e.g. --prior-sigma 0.05")
    checkpoint = _checkpoint_path(args)
    structure = _read_structure(args.structure)
    data = TDSData.read(args.data, structure=structure, temperature=args.temperature, bin=args.bin)
    temperature = data.require_temperature(args.temperature)
    reference, fresh, born = _fit_models(args, structure, shells, cutoff)
    radius, units = _bragg_radius(args.mask_bragg)
    data = data.mask_bragg(radius, structure=structure, units=units)
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
    optimizer = Optimizer(args.optimizer, max_iter=args.max_iter, first_fit_points=args.first_fit_points or None)
    options = dict(temperature=temperature, method=args.model, statistics=args.statistics, scale=args.scale,
                   background=args.background, compton=args.compton, loss=args.loss, optimizer=optimizer,
                   prior_sigma=args.prior_sigma)
    if shells is None and cutoff is None:  # the range the data choose
        options["tds_options"] = _accuracy_options(args)
        model, result = fit_range(structure, data, start=args.start, born=born, fit_born=args.fit_born,
                                  explain_misfit=False, **options)
        start = None
    else:
        start = set_start(fresh, args.start, StartContext(data, temperature, args.statistics,
                                                          args.debye_temperature, say=print))
        model = copy.deepcopy(start).to(_device(args.device))
        options["tds_options"] = ({"sampler": _sampler(model, **sampling)} if args.model == "sampling" else
                                  _accuracy_options(args))
        result = fit(model, data, checkpoint=checkpoint, explain_misfit=False, **options)
    return _report_fit(args, model, result, data, start, reference, options)


def _run_series(args) -> int:
    """The fit command for a temperature series; its exit code as `ase-tds fit`'s (0, 3 not converged, 4 not
    trusted).

    The files are read with the structure, Bragg-masked, and fitted by `fit_series` from the start set on the file
    nearest the mean temperature; with neither --shells nor --cutoff the range is chosen on that file
    (`fit_range`) and the series fitted from its fit.

    Raises:
        ValueError: a single file with --series/--smoothness, or an option of single-file fits (--temperature,
            --checkpoint, --prior-sigma, --model sampling).
    """
    from .data import TDSData
    from .fitting import Optimizer, StartContext, fit, set_start
    from .fitting.range import fit_range
    from .fitting.series import fit_series, nearest_file, reference_temperature
    from .fitting.series_result import series_outputs

    paths = [args.data, *args.more_data]
    if len(paths) < 2:
        raise ValueError("--series and --smoothness fit several data files jointly (a temperature series): give two "
                         "or more data files, or leave them out")
    single = [option for option, given in (("--temperature", args.temperature is not None),
                                           ("--checkpoint", args.checkpoint), ("--prior-sigma", args.prior_sigma),
                                           ("--model sampling", args.model == "sampling")) if given]
    if single:
        raise ValueError(f"{', '.join(single)}: not for a temperature series (several data files, each fitted at its "
                         "own temperature); fit one file at a time for that, or leave it out")
    shells, cutoff = _range_arguments(args)
    structure = _read_structure(args.structure)
    data = [TDSData.read(path, structure=structure, bin=args.bin) for path in paths]
    reference, fresh, born = _fit_models(args, structure, shells, cutoff)
    radius, units = _bragg_radius(args.mask_bragg)
    data = [d.mask_bragg(radius, structure=structure, units=units) for d in data]
    missing = [d.source for d in data if d.temperature is None]
    if missing:
        raise ValueError(f"{', '.join(missing)}: no temperature; a temperature series reads each file's own: add the "
                         "attribute temperature (K) to the file")
    outputs = {(Path(args.out) / name).resolve() for name in series_outputs([d.temperature for d in data])}
    replaced = [path for path in paths if Path(path).resolve() in outputs]
    if replaced:
        raise ValueError(f"--out {args.out} would replace the command's input {replaced[0]}; write the output "
                         "elsewhere")
    near = data[nearest_file(data, reference_temperature([d.temperature for d in data]))]
    optimizer = Optimizer(args.optimizer, max_iter=args.max_iter, first_fit_points=args.first_fit_points or None)
    options = dict(method=args.model, statistics=args.statistics, scale=args.scale, background=args.background,
                   compton=args.compton, loss=args.loss, optimizer=optimizer, tds_options=_accuracy_options(args))
    chosen, start = None, None
    if shells is None and cutoff is None:  # the range the data choose, on the file nearest the mean temperature
        print(f"choosing the range on {near.source} ({near.temperature:g} K)")
        model, chosen = fit_range(structure, near, start=args.start, born=born, fit_born=args.fit_born,
                                  temperature=near.temperature, **options)
    else:
        start = set_start(fresh, args.start, StartContext(near, near.temperature, args.statistics,
                                                          args.debye_temperature, say=print))
        model = copy.deepcopy(start).to(_device(args.device))
    result = fit_series(model, data, series=args.series or "linear", smoothness=args.smoothness, **options)
    if chosen is not None:
        result.settings["range"] = chosen.settings["range"]
    return _report_series(args, model.cpu(), result, data, start, reference)


def _report_series(args, model, result, data, start, reference) -> int:
    """Print the series' table, write its folder, and its exit code: 0, NOT_TRUSTED (the model misses the data, or some
    1σ are not finite) or NOT_CONVERGED."""
    print(result.table())
    _save_fit(args, model, result, data, start, reference)
    if not result.trusted:
        print(f"ase-tds: the series does not describe the data (χ²_red {result.chi2_red:.3g}) or some 1σ are not "
              "finite: its 1σ are not error bars; fit.json's per-temperature χ² shows which file misfits (fit that "
              "one alone to have the fit name what the model lacks)", file=sys.stderr)
        return NOT_TRUSTED
    if not result.status.get("converged", True):
        print(f"ase-tds: the fit did not converge ({result.status['reason']}); its best θ is written, and fit.json "
              "says so. Fit again with a larger --max-iter, or check the start", file=sys.stderr)
        return NOT_CONVERGED
    return 0


def _fit_models(args, structure, shells, cutoff):
    """(the --reference force constants or None, the fresh model of the range asked with the Born charges of --born /
    --fit-born, those charges or None), a phonopy --reference or --start checked to be of `structure`'s crystal."""
    from .model import ForceConstantModel
    from .phonopy_source import PhonopyForceConstants

    reference = PhonopyForceConstants(args.reference) if args.reference else None
    if reference is not None:
        _check_same_lattice(structure, args.structure, reference, f"--reference {args.reference}")
    if Path(args.start).exists():  # a phonopy start: of this crystal, said before any fitting
        _check_same_lattice(structure, args.structure, PhonopyForceConstants(args.start), f"--start {args.start}")
    fresh = ForceConstantModel(structure, shells=None if cutoff is not None else shells or 1, cutoff=cutoff)
    born = _born(args, fresh)
    if born is not None:
        fresh.set_born(born, fit=args.fit_born)
    return reference, fresh, born


def _report_fit(args, model, result, data, start, reference, options: dict) -> int:
    """Print and write the fit's result (a misfit's diagnosis after the folder is written, which it then updates);
    its exit code (0, NOT_CONVERGED or NOT_TRUSTED)."""
    from . import distributed
    from .fitting.fit import explain

    print(result.table())
    _save_fit(args, model, result, data, start, reference)
    if not result.trusted and not result.undetermined:
        explain(model, data, result, options, progress=distributed.is_main())
        if result.missing_physics:
            _save_fit(args, model, result, data, start, reference, verb="updated (the misfit's diagnosis)")
    if not result.trusted and result.undetermined:
        print("ase-tds: the data do not determine the force constants (some 1σ are not finite or absurdly large): "
              "they are not error bars; check --temperature, the |Q| range and the data's units", file=sys.stderr)
        return NOT_TRUSTED
    if not result.trusted:
        likely = result.missing_physics.get("likely")
        print("ase-tds: the model does not describe the data (χ²_red {:.3g}): its 1σ are not error bars. {}".format(
            result.chi2_red, f"Most likely missing: {likely}; cure: {result.missing_physics['cure']}" if likely else
            "fit.json's missing_physics holds what was tried"), file=sys.stderr)
        return NOT_TRUSTED
    if not result.status.get("converged", True):
        print(f"ase-tds: the fit did not converge ({result.status['reason']}); its best θ is written, and fit.json "
              "says so. Resume with --checkpoint and a larger --max-iter, or check the start", file=sys.stderr)
        return NOT_CONVERGED
    return 0


def _save_fit(args, model, result, data, start, reference, verb: str = "wrote") -> None:
    """Write the fit folder (rank 0 under torchrun; every rank waits for it), the model left on its device."""
    from . import distributed

    try:
        if distributed.is_main():
            result.save(args.out, copy.deepcopy(model).cpu(), data, start=start, reference=reference)
    finally:  # every rank waits for rank 0's files: an exit code 3 or 4 must not stop rank 0 mid-save
        distributed.barrier()
    print(f"{verb} {args.out}/")


def _range_arguments(args) -> tuple[int | None, float | None]:
    """(shells, cutoff) of --shells / --cutoff; (None, None) for auto (the default where neither is given)."""
    for name, value, kind in (("--shells", args.shells, int), ("--cutoff", args.cutoff, float)):
        if value is None or value == "auto":
            continue
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not 0 < number < np.inf:
            example = "--shells 5" if kind is int else "--cutoff 5.8"
            what = "number of neighbour shells" if kind is int else "force-constant cutoff in Å"
            raise ValueError(f"{name} {value}: give a positive {what}, e.g. {example}, or auto (the range the "
                             "data choose)")
        return (number, None) if kind is int else (None, number)
    return None, None


def _born(args, model):
    """The Born charges of --born (phonopy's BORN) or, for --fit-born alone, a generic start; None without them."""
    from .dipole import BornCharges
    from .fitting.missing import generic_born

    if args.born:
        return BornCharges.from_phonopy_born(args.born, model.primitive)
    return generic_born(model) if args.fit_born else None


def _checkpoint_path(args) -> Path | None:
    """--checkpoint as a Path (None without one), refused when it is a folder or its folder does not exist."""
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is not None and checkpoint.is_dir():
        raise IsADirectoryError(f"--checkpoint {checkpoint} is a folder; give a file name, e.g. "
                                f"{checkpoint / 'fit.ckpt'}")
    if checkpoint is not None and not checkpoint.parent.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such folder {checkpoint.parent}; create it first")
    if checkpoint is not None:
        _check_writable("--checkpoint", checkpoint, checkpoint.parent)
    return checkpoint


def _run_refine(args) -> int:
    """The refine command: `ase_tds.refine.refine`, its table, the refined potential and the fit folder."""
    from .data import TDSData
    from .refine import load_potential, refine

    for name in ("energy_sigma", "weight_sigma"):
        value = getattr(args, name)
        if value is not None and not 0 < value < np.inf:
            raise ValueError(f"--{name.replace('_', '-')} {value:g}: give a positive width")
    if args.force_sigma is not None and not 0 <= args.force_sigma < np.inf:
        raise ValueError(f"--force-sigma {args.force_sigma:g}: give a width ≥ 0 in eV/Å (0: forces not anchored)")
    if args.lattice_sigma is not None and not 0 <= args.lattice_sigma < 1:
        raise ValueError(f"--lattice-sigma {args.lattice_sigma:g}: give a relative width in [0, 1), e.g. 0.0002 for "
                         "0.02 % (0: the lattice constant held only through the energies)")
    structure = _read_structure(args.structure)
    data = TDSData.read(args.data, structure=structure, temperature=args.temperature)
    radius, units = _bragg_radius(args.mask_bragg)
    data = data.mask_bragg(radius, structure=structure, units=units)
    potential = load_potential(args.potential)
    result, model = refine(potential, structure, data, shells=args.shells, layers=args.layers,
                           temperature=args.temperature, method=args.model, statistics=args.statistics,
                           scale=args.scale, background=args.background, energy_sigma=args.energy_sigma,
                           force_sigma=args.force_sigma, lattice_sigma=args.lattice_sigma,
                           weight_sigma=args.weight_sigma, max_iter=args.max_iter,
                           device=_device(args.device))
    print(result.table())
    saved = result.save(args.out, potential, model, data)
    print(f"wrote {args.out}/ (the refined potential: {saved.name})")
    if not result.fit.trusted:
        return NOT_TRUSTED
    if not result.status["converged"]:
        return NOT_CONVERGED
    return 0


def _run_simulate(args) -> int:
    from .covariance import UnstableError
    from .forward import simulate
    from .model import ForceConstantModel
    from .structure import reciprocal_q
    from .phonopy_source import PhonopyForceConstants

    _check_sampling_arguments(args, seed_is_sampling=False)
    structure = _read_structure(args.structure)
    # the sampling model needs a ForceConstantModel (its pairs on a supercell); the others use phonopy's as they are
    fc = ForceConstantModel.from_phonopy(args.fc) if args.model == "sampling" else PhonopyForceConstants(args.fc)
    _check_same_lattice(structure, args.structure, fc, f"--fc {args.fc}")
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
    route = data.provenance["model"]["method"]  # "fft" where the hkl lie on a regular grid
    print(f"wrote {len(data)} points ({route}, {args.statistics}, {args.temperature:g} K{error}) to {args.out}")
    return 0


def _check_same_lattice(structure, structure_name, fc, fc_name) -> None:
    """Refuse force constants whose lattice (or orientation) is not that of `structure`'s cell."""
    from .structure import integer_matrix

    integer_matrix(structure.cell[:], fc.primitive.cell[:],
                   f"{structure_name}: its cell is not a lattice of the force constants' crystal ({fc_name}) in the "
                   "same orientation", "give the structure the force constants were computed for")


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
    partial = {site: occupancy for site, occupancy in (atoms.info.get("occupancy") or {}).items()
               if any(abs(value - 1) > 1e-6 for value in occupancy.values()) or len(occupancy) > 1}
    if partial:
        site, occupancy = next(iter(partial.items()))
        raise StructureError(f"{path}: partial occupancy (site {site}: {occupancy}); ase_tds models an ordered "
                             "crystal with every site fully occupied, so a disordered one would be fitted as if "
                             "fully occupied; give an ordered structure (e.g. a supercell that places the atoms)")
    return atoms


def _read_hkl(path: Path, structure) -> np.ndarray:
    """hkl (N, 3) r.l.u. from any file of the reader table (ase_tds.io.readers): the hkl of a data file (HDF5
    point list, NXdata, .npz, ...), or a list of points (HDF5 `hkl` alone, .npy, a text file of rows)."""
    from .data import TDSData
    from .io.readers import reader_for

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such hkl file")
    reader = reader_for(path, points_only=True)
    if reader.points_only:
        return reader.read(path)["hkl"]
    return TDSData.read(path, structure=structure).hkl


def _run_export(args) -> int:
    from .export import write_training_data
    from .properties import read_fit_folder

    covariance = read_fit_folder(args.source).covariance if args.ensemble else None
    path = write_training_data(args.source, args.out, args.supercell, args.temperature, args.samples,
                               statistics=args.statistics, seed=args.seed, energy_key=args.energy_key,
                               forces_key=args.forces_key, also_plain=not args.no_plain,
                               device=_device(args.device), covariance=covariance)
    drawn = ", each with θ drawn from the fit's N(θ̂, Σ)" if args.ensemble else ""
    print(f"wrote {args.samples} configurations of the {'×'.join(map(str, args.supercell))} supercell at "
          f"{args.temperature:g} K ({args.statistics}){drawn} to {path}")
    return 0


def _run_properties(args) -> int:
    from .properties import sigma_text, write_properties

    mesh = args.mesh if args.mesh == "auto" else _positive_int("--mesh", args.mesh, "auto or e.g. --mesh 32")
    props = write_properties(args.fitdir, _temperatures(args.temperatures), mesh=mesh, ensemble=args.ensemble,
                             seed=args.seed, device=_device(args.device))
    values, sigma = props.values, props.sigma
    how = f"{props.ensemble['stable']}-member ensemble" if props.ensemble else "linear propagation"
    print(f"phonon properties ±1σ ({how}); thermal properties on the {'×'.join(map(str, props.mesh['mesh']))} mesh")
    for symbol, u, e in zip(props.symbols, values["adp_iso"], sigma["adp_iso"]):
        print(f"U_iso({symbol}) at {props.adp_temperature:g} K: {sigma_text(u, e)} Å²")
    for t in (300.0, float(props.temperatures[-1])):
        i = int(np.argmin(np.abs(props.temperatures - t)))
        print(f"C_v({props.temperatures[i]:g} K) = {sigma_text(values['heat_capacity'][i], sigma['heat_capacity'][i])} "
              "J/K/mol")
    if props.agreement:
        worst = {k: v for k, v in props.agreement.items() if k != "dos"}
        print("linear and ensemble 1σ differ by at most " + ", ".join(f"{k} {100 * v:.1f} %"
                                                                     for k, v in worst.items()))
    print(f"wrote {Path(args.fitdir) / 'properties.json'} and properties.png")
    return 0


def _temperatures(text: str) -> np.ndarray:
    """The K of --temperatures: START:STOP:STEP (STOP included) or a comma-separated list."""
    example = "give START:STOP:STEP in K (e.g. 10:1000:10) or a comma-separated list (e.g. 100,300)"
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            return np.arange(start, stop + step / 2, step)
        return np.array([float(x) for x in text.split(",")])
    except ValueError:
        raise ValueError(f"--temperatures {text}: {example}") from None


def _positive_int(option: str, text: str, example: str) -> int:
    """The positive integer of `option`, or a one-line error with `example`."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{option} {text}: give {example}")
    return value


def _run_plot(args) -> int:
    from .data import TDSData
    from .fitting import FitResult
    from .model import ForceConstantModel
    from .phonopy_source import PhonopyForceConstants
    from .atomic import write_files
    from .maps import best_planes, draw_plane_maps, parse_plane
    from .plot import plot_dispersion, plot_identifiability
    from .report import draw_tds_fit

    first = Path(args.sources[0])
    fit_folder = first.is_dir() and (first / "fit.json").is_file() and (first / "data.h5").is_file()
    planes = [parse_plane(text, "--plane") for text in args.plane or []]
    if planes and not fit_folder:
        raise ValueError(f"--plane maps a fit's data and model: give the folder `ase-tds fit` wrote (fit.json, "
                         f"data.h5) as the first SOURCE, not {first}")
    labels = args.label or args.sources
    if len(labels) != len(args.sources):
        raise ValueError(f"{len(labels)} --label for {len(args.sources)} SOURCE; give one per SOURCE, in order "
                         f"(--label {' '.join(f'NAME{i + 1}' for i in range(len(args.sources)))}), or none")
    if len(set(labels)) < len(labels):
        raise ValueError(f"the legend names {labels} repeat; give each SOURCE its own --label")
    out = Path(args.out) if args.out else (first if first.is_dir() else Path("."))
    device = _device(args.device)
    models = {label: PhonopyForceConstants(source).to(device) for label, source in zip(labels, args.sources)}
    for model, source in zip(list(models.values())[1:], args.sources[1:]):  # one crystal: the first's path
        _check_same_lattice(models[labels[0]].unitcell, args.sources[0], model, source)
    covariance = None
    drawings = {"dispersion.png": lambda path: plot_dispersion(models, path, covariance=covariance)}
    if fit_folder:
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
        for plane in planes:
            drawings[f"tds_plane_{plane.label.replace(' ', '_')}.png"] = \
                lambda path, plane=plane: draw_plane_maps(fitted, result, data, path, [plane])
        if not planes and best_planes(data.hkl[data.mask]):
            drawings["tds_maps.png"] = lambda path: draw_plane_maps(fitted, result, data, path)
    out.mkdir(parents=True, exist_ok=True)
    write_files(out, drawings)  # all drawn, or none written
    for name in drawings:
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
