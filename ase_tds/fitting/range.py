"""A range chosen by the data: grow the model shell by shell, keep the smallest the held-out points do not reject
(docs/theory.md, "The range of the force constants").

The used points are split once (seed 0) into a training part (80 %) and held-out points (20 %). Each candidate, one
more neighbour shell than the last, is fitted to the training points from the previous candidate's fitted force
constants (projected on its basis, the new shell at zero; where those are unstable at the new range, from the
start again) by a lean fit (`lean.fit_loss`: every candidate on the forward model chosen at the start, the data's
σ alone, no 1σ), then judged by the χ² of the held-out points at its fitted θ (nuisance terms profiled there) plus 2
per parameter: AIC on points the fit did not see, so that a shell the data do not need costs more than it gains.
Growth stops two shells after the best score, at `max_shells`, or where the parameters would exceed a tenth of the
training points; where the best candidate is the last one tried, the fit warns that the range may reach further.
The best candidate is then fitted to all points from its training fit by `fit` itself (its own grid and crystals,
the model's error, 1σ). Every candidate is recorded (`FitResult.settings["range"]`).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from tqdm.auto import tqdm

from ..data import TDSData
from ..model import ForceConstantModel
from ..covariance import UnstableError
from ..structure import StructureError, diagonal_supercell_for
from . import lean
from .fit import checked_options, fit
from .result import FitResult
from .starts import StartContext, set_start

HELD_OUT = 0.2
PATIENCE = 2  # shells tried past the best score
MAX_SHELLS = 24  # a bound on the cost; the held-out score and POINTS_PER_PARAMETER end the growth before it
POINTS_PER_PARAMETER = 10


def split(data: TDSData, fraction: float = HELD_OUT, seed: int = 0) -> tuple[TDSData, TDSData]:
    """(training, held-out) copies of `data`, the used points divided at random (the same for the same data).

    Args:
        data: the data; its mask selects the points divided.
        fraction: the held-out share, in (0, 1).
        seed: of the random division.

    Returns:
        Two TDSData with complementary masks.
    """
    used = np.nonzero(np.asarray(data.mask, dtype=bool))[0]
    held = np.zeros(len(data), dtype=bool)
    held[np.random.default_rng(seed).choice(used, size=max(1, int(round(fraction * len(used)))), replace=False)] = True
    return data.with_mask(~held), data.with_mask(held)


def _first(structure, training: TDSData, start: str, born, fit_born: bool, first_shells: int, max_shells: int,
           options: dict, progress: bool, say) -> tuple[ForceConstantModel, int]:
    """(the first candidate at its start, its shells): the smallest model from `first_shells` up whose start is
    stable (central springs of the nearest neighbours alone leave diamond floppy, for one).

    Raises:
        StructureError: no start up to `max_shells` is stable.
    """
    for shells in range(first_shells, max_shells + 1):
        try:
            return _started(structure, training, start, born, fit_born, shells, options, progress, say), shells
        except (StructureError, UnstableError) as err:
            say(f"range: the start with {shells} shells is unstable ({err}); one more shell")
    raise StructureError(f"no start of up to {max_shells} shells is stable: start from a calculator or a phonopy file "
                         "(--start)")


def _started(structure, training: TDSData, start: str, born, fit_born: bool, shells: int, options: dict,
             progress: bool, say) -> ForceConstantModel:
    """A model of `shells` shells at the start named `start` (chosen on `training`), with `born`'s charges.

    Raises:
        StructureError, UnstableError: a start that is unstable at this range.
    """
    model = ForceConstantModel(structure, shells=shells)
    if born is not None:
        model.set_born(born, fit=fit_born)
    return set_start(model, start, StartContext(training, options.get("temperature"),
                                                options.get("statistics", "quantum"), progress=progress, say=say))


def _grown(previous: ForceConstantModel, shells: int) -> ForceConstantModel:
    """A model of `shells` shells started at `previous`'s fitted constants (their Born charges carried along)."""
    model = ForceConstantModel(previous.unitcell, shells=shells, symprec=previous.symprec)
    if previous.born is not None:
        born = previous.born_charges()
        model.set_born(born, fit=previous.born_basis is not None)
    matrix = diagonal_supercell_for(np.array(previous.unitcell.cell[:]), max(model.cutoff, previous.cutoff))
    return model.set_from_phonopy(previous.to_phonopy(matrix))


def fit_range(structure, data: TDSData, *, start: str = "springs", born=None, fit_born: bool = False,
              first_shells: int = 1, max_shells: int = MAX_SHELLS, progress: bool = True,
              explain_misfit: bool = True, **options) -> tuple[ForceConstantModel, FitResult]:
    """Fit with the range the data choose: see the module docstring.

    Args:
        structure (ase.Atoms): the crystal.
        data: the data; its mask selects the points used.
        start: the first candidate's start (a name of `STARTS` or a phonopy file).
        born (BornCharges | None): Born charges of the crystal (fixed, or the start of fitted ones).
        fit_born: fit the Born charges and ε∞ too.
        first_shells: the smallest candidate.
        max_shells: the largest candidate.
        progress: progress bars and a line per candidate.
        explain_misfit: as `fit`, for the chosen range's fit to all the points.
        **options (Any): keyword arguments of `fit` (method, statistics, scale, background, tds_options, ...).

    Returns:
        The chosen range's model and its fit to all the points; the result's settings["range"] holds every
            candidate (shells, cutoff Å, parameters, χ²_red of the training points, held-out χ² per point, score,
            the optimiser's status, restarted (from the start: the last candidate's constants were unstable),
            seconds).
    """
    options = dict(options, scale=checked_options(ForceConstantModel(structure, shells=first_shells), data,
                                                  options.get("method", "gaussian"), options.get("scale"),
                                                  options.get("loss", "chi2"), None, options.get("tds_options")))
    training, held_out = split(data)
    say = tqdm.write if progress else (lambda text: None)
    model, first_shells = _first(structure, training, start, born, fit_born, first_shells, max_shells, options,
                                 progress, say)
    settings = lean.forward_settings(model, data, options)  # every candidate on this footing
    candidates, best, chosen, too_few_points = [], None, None, False
    for shells in range(first_shells, max_shells + 1):
        if shells > first_shells:
            model = _grown(model, shells)
        if model.n_params * POINTS_PER_PARAMETER > training.n_used:
            say(f"range: {shells} shells would have {model.n_params} parameters, more than a tenth of the "
                f"{training.n_used} training points; stopping")
            too_few_points = True
            break
        began, restarted = time.perf_counter(), False
        try:
            loss, status = lean.fit_loss(model, training, settings, options)
        except UnstableError as err:  # the last candidate's constants, stable where it was fitted, are not here
            if shells == first_shells:
                raise
            say(f"range: {shells} shells from the last candidate's constants are unstable ({err}); from the start")
            try:
                model = _started(structure, training, start, born, fit_born, shells, options, progress, say)
                loss, status, restarted = *lean.fit_loss(model, training, settings, options), True
            except (StructureError, UnstableError) as again:
                say(f"range: {shells} shells are unstable from the start too ({again}); the range ends at the best "
                    "candidate so far")
                break
        chi2 = lean.objective(model, held_out, settings, options).evaluate(model.theta.detach().cpu().numpy())[0]
        record = dict(shells=shells, cutoff=model.cutoff, parameters=model.n_params,
                      chi2_red_training=loss / max(training.n_used - model.n_params, 1),
                      held_out_chi2_per_point=chi2 / held_out.n_used, score=chi2 + 2 * model.n_params, status=status,
                      restarted=restarted, seconds=time.perf_counter() - began)
        candidates.append(record)
        say(f"range: {shells} shells, cutoff {model.cutoff:.3f} Å, {model.n_params} parameters: χ²_red "
            f"{record['chi2_red_training']:.3f} (training), {record['held_out_chi2_per_point']:.3f} per held-out "
            f"point ({record['seconds']:.0f} s)")
        if best is None or record["score"] < candidates[best]["score"]:
            best, chosen = len(candidates) - 1, model  # `_grown` leaves it as fitted
        elif len(candidates) - 1 - best >= PATIENCE:
            break
    began = time.perf_counter()
    result = fit(chosen, data, progress=progress, explain_misfit=explain_misfit, **options)
    final = time.perf_counter() - began
    limit = best == len(candidates) - 1 and (candidates[-1]["shells"] >= max_shells or too_few_points)
    result.settings["range"] = dict(candidates=candidates, chosen=candidates[best], held_out=HELD_OUT,
                                    rule="smallest held-out χ² + 2 per parameter", at_limit=bool(limit),
                                    final_fit_seconds=final,
                                    cost_over_final_fit=(final + sum(c["seconds"] for c in candidates)) / final)
    say(f"range: chose {candidates[best]['shells']} shells (cutoff {chosen.cutoff:.3f} Å, {chosen.n_params} "
        "parameters)" + (" — the largest tried: the data may ask for more" if limit else ""))
    if limit:
        bound = (f"the largest {training.n_used} training points allow ({POINTS_PER_PARAMETER} per parameter)"
                 if too_few_points else "the largest asked for (max_shells)")
        text = (f"the range ends at {bound}, {chosen.cutoff:.3f} Å, with the held-out score still falling: the force "
                "constants likely reach further, and the phonons carry a truncation error their 1σ leave out; more "
                "points let the range grow (or give a longer one: --shells N / shells=N)")
        result.warnings.append(text)
        warnings.warn(text, stacklevel=2)
    return chosen, result
