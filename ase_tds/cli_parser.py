"""The `ase-tds` command line's arguments: one function per command; the choice lists read the package's tables
(`ase_tds.forward.MODELS`, `ase_tds.fitting.OPTIMIZERS`, `covariance.STATISTICS`, `objective.LOSSES`). `ase_tds.cli`
runs them."""

from __future__ import annotations

import argparse

DEMO_POINTS = 1500
SAMPLES = 64  # thermal configurations per evaluation of the sampling model (the samplers' default)
FIT_SEED = 0  # the sampling model's seed in a fit: fixed noise, a smooth loss (common random numbers)


def build_parser(runs: dict) -> argparse.ArgumentParser:
    """The `ase-tds` argument parser; `runs` {command: function(args) -> exit code} are set as each command's `run`."""
    parser = argparse.ArgumentParser(prog="ase-tds", description="Fit force constants to X-ray thermal diffuse scattering.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(title="commands")
    for add in (_add_demo_parser, _add_fit_parser, _add_refine_parser, _add_simulate_parser, _add_export_parser,
                _add_plot_parser, _add_properties_parser):
        command = add(sub, runs)
        # --debug after the subcommand too; SUPPRESS keeps the main parser's value where it is not given here
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def _add_demo_parser(sub, runs) -> argparse.ArgumentParser:
    demo = sub.add_parser("demo", help="nickel end to end: simulate from EMT, fit from a bad start, check recovery",
                          description="Nickel end to end: simulate from EMT, fit from a bad start, check recovery. "
                                      "Exit code 0: recovered; 1: the fit did not recover the truth within its "
                                      "tolerances; 2: bad input; 130: interrupted.")
    demo.add_argument("--out", default="ase_tds_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--points", type=int, default=DEMO_POINTS, help="number of Q points (default: %(default)s)")
    _add_device_argument(demo)
    _add_accuracy_argument(demo)
    demo.set_defaults(run=runs["demo"], out_kind="folder", overwrite=True)  # the demo's own folder, remade each run
    return demo


def _add_fit_parser(sub, runs) -> argparse.ArgumentParser:
    from .forward import MODELS

    fit = sub.add_parser("fit", help="fit force constants to a TDS data file",
                         description="Fit force constants to a TDS data file. Exit code 0: converged; 3: stopped "
                                     "without converging (iteration limit or a stall; the best θ is still written "
                                     "and fit.json's status says why); 4: the model does not describe the data "
                                     "(χ² far above its expectation: the 1σ are not error bars; the fit names what "
                                     "it most likely misses, also in fit.json), or its 1σ are not finite; 2: bad "
                                     "input; 130: interrupted.")
    fit.add_argument("structure", help="structure file (any format ase.io.read reads) that the data's hkl index")
    fit.add_argument("data", help="HDF5 point list, NeXus NXdata volume or .npz")
    fit.add_argument("more_data", nargs="*", metavar="MORE_DATA",
                     help="further data files, each at its own temperature (read from the file): all the files are "
                          "fitted jointly as a temperature series (--series)")
    fit.add_argument("--out", required=True, help="output folder")
    _add_overwrite_argument(fit, "folder")
    group = fit.add_mutually_exclusive_group()
    group.add_argument("--shells", help="neighbour shells in the model, or auto: the range the data choose (held-out "
                                        "points, docs/theory.md) (default: auto)")
    group.add_argument("--cutoff", help="force-constant cutoff in Å, or auto (as --shells auto)")
    fit.add_argument("--born", metavar="FILE",
                     help="phonopy's BORN file (factor, ε∞, Born charges of the symmetry-independent atoms): the "
                          "dipole–dipole forces of a polar crystal are added to the model (fixed, unless --fit-born)")
    fit.add_argument("--fit-born", action="store_true",
                     help="fit the Born charges (site-symmetry basis, charge neutral) with the force constants, from "
                          "--born's values or a generic start (±0.5 e); ε∞ stays as given (--born's, else 3): the "
                          "scattering sees the charges only through Z*/√ε∞ (docs/theory.md, Polar crystals)")
    fit.add_argument("--temperature", type=float, help="K (overrides the file's)")
    fit.add_argument("--model", default="gaussian", choices=list(MODELS),
                     help="forward model: one-phonon, gaussian (all orders, exact for a harmonic crystal) or "
                          "sampling (Monte Carlo on a periodic supercell, fitted by Adam unless --optimizer lbfgs; "
                          "see --samples) (default: %(default)s)")
    _add_fit_options(fit)
    _add_fit_series(fit)
    _add_fit_start(fit)
    _add_fit_run(fit)
    _add_device_argument(fit)
    _add_accuracy_argument(fit)
    _add_sampling_arguments(fit, "the structure's cell",
                            f"seed of the sampling model's displacements, fixed so that the loss is a smooth "
                            f"function of the force constants (common random numbers) (default: {FIT_SEED})")
    fit.set_defaults(run=runs["fit"], out_kind="folder")
    return fit


def _add_fit_options(fit) -> None:
    """The fit's model of the data: optimiser, statistics, scale, background, Compton, loss."""
    from .fitting import OPTIMIZERS
    from .fitting.objective import LOSSES

    fit.add_argument("--optimizer",  # checked by the API's table (Optimizer), which may grow after this parser
                     help=f"{' or '.join(OPTIMIZERS)} (a name of ase_tds.fitting.OPTIMIZERS); default: lbfgs, adam "
                          "for --model sampling (whose loss is deterministic with its fixed --seed, so lbfgs "
                          "converges in fewer evaluations there too)")
    _add_statistics_argument(fit)
    fit.add_argument("--scale", choices=["free", "fixed"],
                     help="intensity scale: free, or fixed to 1 for data in e.u./atom (default: fixed when the data "
                          "file's units are e.u./atom, else free)")
    fit.add_argument("--background", default="free", choices=["free", "none"],
                     help="a constant background in data units, free or none (default: %(default)s)")
    fit.add_argument("--compton", action="store_true",
                     help="also fit the incoherent (Compton) scattering: Hubbell's S(|Q|) of the crystal's atoms "
                          "(e.u./atom) times a free amplitude (1 = all of it, for data in e.u./atom)")
    fit.add_argument("--loss", default="chi2", choices=list(LOSSES),
                     help="chi2: Σ((model − I)/σ)²; poisson: the Poisson deviance of the counts n = t·I, the "
                          "exposure t (counts per unit of intensity) inferred per point as I/σ², so the data "
                          "need intensities ≥ 0 and σ = √n/t (default: %(default)s)")


def _add_fit_series(fit) -> None:
    """A temperature series (several data files): --series, --smoothness."""
    from .fitting.series import SERIES, SMOOTHNESS

    fit.add_argument("--series", choices=list(SERIES),
                     help="several data files: linear (force constants θ(T) = θ₀ + (T − T₀)·θ′, T₀ the mean "
                          "temperature) or independent (one θ per temperature, tied by --smoothness) (default: linear)")
    fit.add_argument("--smoothness", type=float, metavar="EV_PER_A2_PER_K",
                     help=f"--series independent: the width of the prior on the slope (θ_(i+1) − θ_i)/ΔT between "
                          f"neighbouring temperatures, in eV/Å² per K; smaller ties them closer (default: "
                          f"{SMOOTHNESS:g})")


def _add_fit_start(fit) -> None:
    """Where the fit starts from and what holds it there: --checkpoint, --start, --debye-temperature, --prior-sigma."""
    fit.add_argument("--checkpoint", metavar="FILE",
                     help="JSON file rewritten after every iteration; if it exists, the fit resumes from it "
                          "(same model and settings; --max-iter counts the iterations before it too)")
    fit.add_argument("--start", default="emt",
                     help="starting force constants: emt (ASE's EMT, a few metals), springs (central springs "
                          "between all pairs within the cutoff, stable, scaled to --debye-temperature: any crystal), "
                          "calculator:module.Class (any importable ASE calculator built with no arguments, e.g. a "
                          "machine-learned potential, by finite displacements), a phonopy file, or zero; the names "
                          "are those of ase_tds.fitting.STARTS (default: %(default)s)")
    fit.add_argument("--debye-temperature", type=float,
                     help="K, the Debye temperature that --start springs is scaled to (default: the one of 100–1600 K "
                          "whose springs fit the data best, searched on past an edge where the best lies there)")
    fit.add_argument("--prior-sigma", type=float, metavar="EV_PER_A2",
                     help="a ridge towards the start: each force constant gets a prior of this width (eV/Å²), so "
                          "that combinations the data do not determine (named by the fit, drawn in "
                          "identifiability.png) stay near the start while the rest converge (default: none)")


def _add_fit_run(fit) -> None:
    """Which points and how long: --bin, --reference, --mask-bragg, --max-iter, --first-fit-points."""
    fit.add_argument("--bin", type=int, default=1, metavar="K",
                     help="NeXus volumes: average K×K×K voxels into one point (σ propagated), for a look at the data: "
                          "the model is evaluated at the block's mean hkl, which near Bragg peaks is far from the "
                          "block's mean intensity, so a binned fit is biased (default: %(default)s, every measured "
                          "voxel)")
    fit.add_argument("--reference", help="phonopy file drawn (as it is) in dispersion.png for comparison")
    fit.add_argument("--mask-bragg", "--bragg-radius", default="0.1", metavar="R",
                     help="mask the points within R of the structure's allowed Bragg reflections (nonzero structure "
                          "factor) and those on any reciprocal-lattice vector: R in r.l.u. (0.1), or in Å⁻¹ with the "
                          "suffix invA (0.05invA); 0 masks nothing (default: %(default)s)")
    fit.add_argument("--max-iter", type=int, default=200, help="iterations of the optimiser (default: %(default)s)")
    fit.add_argument("--first-fit-points", type=int, default=100_000, metavar="N",
                     help="data of more than 2N points are first fitted on a random subset of N, then on all of "
                          "them from there (the result is the fit of all the points); 0: all points from the start "
                          "(default: %(default)s)")


def _add_refine_parser(sub, runs) -> argparse.ArgumentParser:
    from .forward import MODELS

    refine = sub.add_parser("refine", help="refine a machine-learned potential's own weights against TDS data",
                            description="Refine a machine-learned potential's own weights (by default its readout "
                                        "layers) so that its force constants fit TDS data, anchored to its pretrained "
                                        "energies and forces (docs/refine.md). Writes the refined potential in its "
                                        "own format and the fit folder. Exit code 0: done; 2: bad input; 3: "
                                        "stopped at --max-iter before converging; 4: the refined potential does not "
                                        "describe the data (χ²_red far above 1); 130: interrupted.")
    refine.add_argument("structure", help="structure file (any format ase.io.read reads) that the data's hkl index")
    refine.add_argument("data", help="HDF5 point list, NeXus NXdata volume or .npz")
    refine.add_argument("--potential", required=True,
                        help="chgnet | sevenn (pretrained; chgnet:FILE, sevenn:FILE a saved one) | module:Class (an "
                             "importable torch.nn.Module built with no arguments, forward(positions, atoms) → eV)")
    refine.add_argument("--out", required=True, help="output folder")
    _add_overwrite_argument(refine, "folder")
    refine.add_argument("--layers", nargs="+", metavar="PREFIX",
                        help="name prefixes of the weights refined, or all (default: the potential's readout)")
    refine.add_argument("--shells", type=int, default=5, help="neighbour shells of the force constants fitted "
                                                              "(default: %(default)s)")
    refine.add_argument("--temperature", type=float, help="K (overrides the file's)")
    refine.add_argument("--model", default="gaussian", choices=list(MODELS), help="forward model (default: %(default)s)")
    _add_statistics_argument(refine)
    refine.add_argument("--scale", choices=["free", "fixed"],
                        help="intensity scale (default: fixed for data in e.u./atom, else free)")
    refine.add_argument("--background", default="free", choices=["free", "none"],
                        help="a constant background (default: %(default)s)")
    refine.add_argument("--mask-bragg", "--bragg-radius", default="0.1", metavar="R",
                        help="as fit's: mask the points within R of the allowed Bragg reflections, R in r.l.u. or "
                             "with the suffix invA in Å⁻¹ (default: %(default)s)")
    refine.add_argument("--energy-sigma", type=float, metavar="EV_PER_ATOM",
                        help="anchor: tolerance of the reference energies, eV/atom (default: 0.002)")
    refine.add_argument("--force-sigma", type=float, metavar="EV_PER_A",
                        help="anchor: tolerance of the reference forces, eV/Å; 0: forces not anchored (default: 0.1)")
    refine.add_argument("--lattice-sigma", type=float, metavar="RELATIVE",
                        help="anchor: tolerance of the equilibrium lattice constant, relative; 0: held only through "
                             "the energies (default: 0.0002)")
    refine.add_argument("--weight-sigma", type=float,
                        help="an L2 pull of the refined weights to the pretrained ones, of this width (default: none)")
    refine.add_argument("--max-iter", type=int, default=200,
                        help="the most L-BFGS iterations; it stops earlier when converged (default: %(default)s)")
    _add_device_argument(refine)
    refine.set_defaults(run=runs["refine"], out_kind="folder")
    return refine


def _add_simulate_parser(sub, runs) -> argparse.ArgumentParser:
    from .forward import MODELS

    sim = sub.add_parser("simulate", help="TDS intensities from phonopy force constants (used as they are)",
                         description="Diffuse intensities in e.u./atom at the hkl of a file, from force constants "
                                     "used as they are (not projected); written as an HDF5 point list (docs/data-format.md).")
    sim.add_argument("structure", help="structure file whose cell the hkl index (same lattice and orientation as the "
                                       "force constants' crystal)")
    sim.add_argument("--fc", required=True, help="phonopy.load-able file, or a folder holding phonopy_params.yaml")
    sim.add_argument("--hkl", required=True, help="HDF5 point list or .npz (its hkl), .npy or text file of hkl rows")
    sim.add_argument("--temperature", type=float, required=True, help="K")
    sim.add_argument("--model", default="gaussian", choices=list(MODELS),
                     help="forward model (default: %(default)s); sampling takes the force constants into a "
                          "symmetry-adapted model as `ase-tds export` does (exact for files ase_tds wrote) and "
                          "writes its Monte-Carlo standard error as σ")
    _add_statistics_argument(sim)
    sim.add_argument("--counts", type=float, help="Poisson noise: counts at the mean intensity (default: none)")
    sim.add_argument("--out", required=True, help="output HDF5 file")
    _add_overwrite_argument(sim, "file")
    _add_device_argument(sim)
    _add_accuracy_argument(sim)
    _add_sampling_arguments(sim, "the force constants' unit cell",
                            "random seed of the Poisson noise and of the sampling model's displacements "
                            "(default: fresh randomness)", seed_outside=True)
    sim.set_defaults(run=runs["simulate"], out_kind="file")
    return sim


def _add_export_parser(sub, runs) -> argparse.ArgumentParser:
    export = sub.add_parser("export", help="MLIP training data: thermal configurations with harmonic energies and forces",
                            description="Thermal configurations of a supercell drawn from the fitted force constants "
                                        "(Cholesky sampler), with E = ½uᵀΦu (eV) and F = −Φu (eV/Å), as extxyz.")
    export.add_argument("source", help="output folder of `ase-tds fit`/`demo`, or a phonopy.load-able file")
    export.add_argument("--supercell", type=int, nargs=3, required=True, metavar=("A", "B", "C"),
                        help="repetitions of the unit cell")
    export.add_argument("--temperature", type=float, required=True, help="K")
    export.add_argument("--samples", type=int, required=True, help="number of configurations")
    export.add_argument("--out", required=True, help="output file, e.g. train.extxyz")
    _add_overwrite_argument(export, "file")
    _add_statistics_argument(export)
    export.add_argument("--seed", type=int, help="random seed")
    export.add_argument("--energy-key", default="REF_energy", help="info key of the energy (default: %(default)s)")
    export.add_argument("--forces-key", default="REF_forces", help="array key of the forces (default: %(default)s)")
    export.add_argument("--no-plain", action="store_true", help="do not also write plain energy/forces")
    export.add_argument("--ensemble", action="store_true",
                        help="draw each configuration's force constants θ from N(θ̂, Σ) of the fit (SOURCE must be a "
                             "fit folder), recorded in the frame's info['theta'] (eV/Å², in fit.json's order), so "
                             "that the training data carry the fit's uncertainty")
    _add_device_argument(export)
    export.set_defaults(run=runs["export"], out_kind="file")
    return export


def _add_plot_parser(sub, runs) -> argparse.ArgumentParser:
    plot = sub.add_parser("plot", help="phonon dispersions of force-constant files, and a fit folder's TDS fit",
                          description="Draw the phonon dispersions of one or more force-constant sources (as they are) "
                                      "on the standard path of the first, into OUT/dispersion.png; when the first is an "
                                      "`ase-tds fit`/`demo` folder, also redraw OUT/tds_fit.png and OUT/identifiability.png from its data.h5 "
                                      "and fit.json, shade the fit's ±1σ band of frequencies, and map data, model and "
                                      "(data − model)/σ in reciprocal-space planes: OUT/tds_maps.png (the data's "
                                      "best-populated planes) or, with --plane, OUT/tds_plane_<plane>.png.")
    plot.add_argument("sources", nargs="+", metavar="SOURCE",
                      help="output folder of `ase-tds fit`/`demo`, or a phonopy.load-able file")
    plot.add_argument("--label", nargs="+", action="extend",
                      help="legend names, one per SOURCE in order: --label a b or --label a --label b "
                           "(default: the SOURCE as typed)")
    plot.add_argument("--out", help="output folder, made if missing (default: the first SOURCE if a folder, else "
                                    "the current folder)")
    plot.add_argument("--plane", action="append", metavar="'h k 0.5'",
                      help="a plane of the fit folder's data to map (data, model, (data − model)/σ) into "
                           "OUT/tds_plane_h_k_0.5.png: two free letters and one number in their places, e.g. "
                           "'h k 0.5', 'h 0 l' or '0.5 k l'; the voxels of the nearest layer of a volume, or the "
                           "points within 0.05 r.l.u. of a point list; repeat for more planes (default: the data's "
                           "best-populated planes, into OUT/tds_maps.png)")
    _add_device_argument(plot)
    plot.set_defaults(run=runs["plot"], out_kind="folder", overwrite=True)  # plot redraws its pictures, by design
    return plot


def _add_properties_parser(sub, runs) -> argparse.ArgumentParser:
    props = sub.add_parser("properties", help="phonon DOS, heat capacity, entropy, free energy and ADPs with 1σ",
                           description="Phonon properties of a fit with their 1σ from θ ~ N(θ̂, Σ): phonopy's DOS, "
                                       "C_v(T), S(T) and F(T) of the fitted force constants, and the atomic "
                                       "displacement parameters U_ij at the fit's temperature; written into FITDIR as "
                                       "properties.json and properties.png. The q meshes are doubled until the values "
                                       "change by less than 1e-3.")
    props.add_argument("fitdir", metavar="FITDIR", help="output folder of `ase-tds fit`/`demo` (fit.json and "
                                                        "phonopy_params.yaml)")
    props.add_argument("--temperatures", default="10:1000:10", metavar="START:STOP:STEP",
                       help="K of the thermal properties: START:STOP:STEP (STOP included) or a comma-separated list "
                            "(default: %(default)s)")
    props.add_argument("--ensemble", type=int, default=0, metavar="N",
                       help="also propagate by N members drawn from N(θ̂, Σ), e.g. 1000, and compare with the linear "
                            "propagation (default: linear only)")
    props.add_argument("--mesh", default="auto",
                       help="auto (converged to 1e-3) or q points along the longest reciprocal axis (default: "
                            "%(default)s)")
    props.add_argument("--seed", type=int, default=0, help="seed of the ensemble (default: %(default)s)")
    _add_device_argument(props)
    props.set_defaults(run=runs["properties"], out=None)  # written into FITDIR, its own outputs replaced
    return props


def _add_device_argument(parser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _add_statistics_argument(parser) -> None:
    from .covariance import STATISTICS

    parser.add_argument("--statistics", default="quantum", choices=list(STATISTICS),
                        help="phonon occupations (default: %(default)s)")


def _add_overwrite_argument(parser, kind: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing --out {kind} (never one of the command's inputs); without it an "
                             f"existing --out is refused")


def _add_accuracy_argument(parser) -> None:
    parser.add_argument("--accuracy", type=float,
                        help="relative error of the gaussian (all-order) model that its grid is chosen for: the "
                             "intensities change by less than this on a grid 1.5× larger (default: 1e-3); "
                             "--grid L1 L2 L3 sets the grid instead")
    parser.add_argument("--grid", type=int, nargs=3, metavar=("L1", "L2", "L3"),
                        help="the gaussian model's periodic crystal, in primitive cells (default: chosen for --accuracy)")


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
