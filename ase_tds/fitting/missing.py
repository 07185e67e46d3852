"""What a misfit is missing: evidence computed from the data, not a list of guesses (docs/theory.md, "A fit that
names the physics it misses").

When χ² lies far above its expectation (`diagnosis.misfit`), the fitted model is extended by each piece of physics
it may lack, and each extension is fitted to (a subset of) the same points from the fitted θ:
- "range": one more neighbour shell (the force constants reach further than the cutoff);
- "dipole": Born effective charges and ε∞ fitted (the long-range dipole–dipole forces of a polar crystal), for a
  crystal without them whose symmetry allows charges.
The drop of χ² each gives, against the number of parameters it adds, is the evidence: the extension with the
largest significant drop (more than 2 per parameter plus five standard deviations of a χ² of that many degrees of
freedom) is named with its cure. The record goes to `FitResult.missing_physics` and fit.json.
"""

from __future__ import annotations

import copy

import numpy as np

from ..covariance import UnstableError
from ..model import ForceConstantModel
from ..structure import diagonal_supercell_for, pair_distances
from . import lean

SUBSET = 1500  # points refitted per extension
ITERATIONS = 20
CURES = {"range": "a longer range: --cutoff auto (or a larger --cutoff / --shells)",
         "dipole": "the dipole–dipole forces of Born charges: --born BORN (phonopy's file), or --fit-born"}


def generic_born(model: ForceConstantModel, charge: float = 0.5, epsilon: float = 3.0):
    """Born charges to start a fit of them from nothing: each charge basis tensor's diagonal entry `charge`, each
    ε∞ diagonal entry `epsilon`, off-diagonal entries zero (`ase_tds.born`)."""
    from ..born import born_basis
    from ..dipole import BornCharges

    basis = born_basis(model.primitive, model.symprec)
    diagonal = np.array([label[-2] == label[-1] for label in basis.labels])
    k = len(basis.charges)
    charges = np.einsum("k,knab->nab", np.where(diagonal[:k], charge, 0.0), basis.charges)
    eps = np.einsum("k,kab->ab", np.where(diagonal[k:], epsilon, 0.0), basis.epsilon)
    return BornCharges(charges, eps)


def _extensions(model: ForceConstantModel) -> dict:
    """{name: extended copy of the fitted model} for each piece of physics the model lacks."""
    out = {}
    wider = ForceConstantModel(model.unitcell, cutoff=_next_cutoff(model), symprec=model.symprec)
    if model.born is not None:
        wider.set_born(model.born_charges(), fit=model.born_basis is not None)
    matrix = diagonal_supercell_for(np.array(model.unitcell.cell[:]), wider.cutoff)
    out["range"] = wider.set_from_phonopy(model.to_phonopy(matrix))
    if model.born is None:
        polar = copy.deepcopy(model)
        born = generic_born(polar)
        if float(born.charges.abs().max()) > 0:
            out["dipole"] = polar.set_born(born, fit=True)
    return out


def _next_cutoff(model: ForceConstantModel) -> float:
    """A cutoff mid-way between the next neighbour shell beyond the model's and the one after it."""
    radii = pair_distances(model.primitive, model.cutoff + 4.0)
    beyond = radii[radii > model.cutoff + 1e-6]
    return float(0.5 * (beyond[0] + beyond[1])) if len(beyond) > 1 else model.cutoff + 1.0


def diagnose(model, data, result, options: dict) -> dict:
    """Refit the fitted `model` and each of its extensions on up to SUBSET of the used points from the fitted θ, and
    name the most likely missing physics (see the module docstring).

    Each refit is a lean fit (`lean.fit_loss`) of at most ITERATIONS L-BFGS iterations on the forward model of the
    fit (its grid as chosen, the data's weights): what the extension gains in χ², not a full fit with its 1σ.

    Args:
        model (ForceConstantModel): the fitted model (left unchanged).
        data (TDSData): the data fitted.
        result (FitResult): its result (its settings give the forward model).
        options: the fit's keyword arguments (scale, background, compton, loss, exposure; form_factors and chunk of
            tds_options).

    Returns:
        dict: "extensions" (name, added_parameters, chi2_drop, threshold, significant per extension), "likely"
            (a name or None), "cure" (text) and "subset" (points refitted).
    """
    used = np.nonzero(np.asarray(data.mask, dtype=bool))[0]
    pick = used[np.random.default_rng(0).permutation(len(used))[:SUBSET]]
    subset = data.select(np.sort(pick))
    refit = lambda m: lean.fit_loss(m, subset, result.settings, options, ITERATIONS)[0]
    try:
        chi2_base = refit(copy.deepcopy(model))
    except UnstableError:
        chi2_base = None
    records = []
    for name, extended in _extensions(model).items():
        added = extended.n_params - model.n_params
        try:
            chi2 = refit(extended)
        except (UnstableError, ValueError) as err:
            records.append(dict(name=name, added_parameters=added, error=str(err), significant=False))
            continue
        drop = None if chi2_base is None else chi2_base - chi2
        threshold = 2 * added + 5 * np.sqrt(2 * added)
        records.append(dict(name=name, added_parameters=added, chi2_drop=drop, threshold=threshold,
                            significant=bool(drop is not None and drop > threshold)))
    significant = [r for r in records if r["significant"]]
    likely = max(significant, key=lambda r: r["chi2_drop"] / r["added_parameters"])["name"] if significant else None
    return dict(extensions=records, likely=likely, cure=CURES.get(likely, "none of the extensions tried explains the "
                                                                        "misfit: check the data's σ and the start"),
                subset=len(pick), iterations=ITERATIONS)


def note(record: dict) -> str:
    """The warning a misfit's diagnosis gives."""
    if record["likely"] is None:
        return "the misfit's cause was not found: " + record["cure"]
    best = next(r for r in record["extensions"] if r["name"] == record["likely"])
    return (f"the misfit most likely comes from missing {record['likely']} physics: adding it lowers χ² by "
            f"{best['chi2_drop']:.3g} with {best['added_parameters']} parameters on {record['subset']} points; cure: "
            f"{record['cure']}. The 1σ of this fit cannot be trusted")
