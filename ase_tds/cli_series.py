"""`ase-tds fit STRUCTURE a.h5 b.h5 c.h5`: several data files, each at its own temperature, fitted jointly as a
temperature series (`ase_tds.fitting.series`); `ase_tds.cli` dispatches here when more than one file is given."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from . import cli


def series_command(args) -> int:
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
    from .model import ForceConstantModel
    from .phonopy_source import PhonopyForceConstants

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
    shells, cutoff = cli._range_arguments(args)
    structure = cli._read_structure(args.structure)
    data = [TDSData.read(path, structure=structure, bin=args.bin) for path in paths]
    reference = PhonopyForceConstants(args.reference) if args.reference else None
    if reference is not None:
        cli._check_same_lattice(structure, args.structure, reference, f"--reference {args.reference}")
    if Path(args.start).exists():
        cli._check_same_lattice(structure, args.structure, PhonopyForceConstants(args.start), f"--start {args.start}")
    fresh = ForceConstantModel(structure, shells=None if cutoff is not None else shells or 1, cutoff=cutoff)
    born = cli._born(args, fresh)
    if born is not None:
        fresh.set_born(born, fit=args.fit_born)
    radius, units = cli._bragg_radius(args.mask_bragg)
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
                   compton=args.compton, loss=args.loss, optimizer=optimizer, tds_options=cli._accuracy_options(args))
    chosen, start = None, None
    if shells is None and cutoff is None:  # the range the data choose, on the file nearest the mean temperature
        print(f"choosing the range on {near.source} ({near.temperature:g} K)")
        model, chosen = fit_range(structure, near, fit, start=args.start, born=born, fit_born=args.fit_born,
                                  temperature=near.temperature, **options)
    else:
        start = set_start(fresh, args.start, StartContext(near, near.temperature, args.statistics,
                                                          args.debye_temperature, say=print))
        model = copy.deepcopy(start).to(cli._device(args.device))
    result = fit_series(model, data, series=args.series or "linear", smoothness=args.smoothness, **options)
    if chosen is not None:
        result.settings["range"] = chosen.settings["range"]
    return _report_series(args, model.cpu(), result, data, start, reference)


def _report_series(args, model, result, data, start, reference) -> int:
    """Print the series' table, write its folder (rank 0 under torchrun, the others wait), and its exit code: 0,
    `cli.NOT_TRUSTED` (the model misses the data, or some 1σ are not finite) or `cli.NOT_CONVERGED`."""
    from . import distributed

    print(result.table())
    try:
        if distributed.is_main():
            result.save(args.out, model, data, start=start, reference=reference)
    finally:  # every rank waits for rank 0's files
        distributed.barrier()
    print(f"wrote {args.out}/")
    if not result.trusted:
        print(f"ase-tds: the series does not describe the data (χ²_red {result.chi2_red:.3g}) or some 1σ are not "
              "finite: its 1σ are not error bars; fit.json's per-temperature χ² shows which file misfits (fit that "
              "one alone to have the fit name what the model lacks)", file=sys.stderr)
        return cli.NOT_TRUSTED
    if not result.status.get("converged", True):
        print(f"ase-tds: the fit did not converge ({result.status['reason']}); its best θ is written, and fit.json "
              "says so. Fit again with a larger --max-iter, or check the start", file=sys.stderr)
        return cli.NOT_CONVERGED
    return 0
