"""Where a fit starts: one table of named starts (`STARTS`), used by `fit(model, data, start=NAME)`, by
`set_start(model, NAME)` and by `ase-tds fit --start NAME`.

A start is a function `start(model, argument, context) -> model` that sets the model's θ in place: `argument` is
what follows the name's colon ("calculator:ase.calculators.emt.EMT" → "ase.calculators.emt.EMT"; "" without one)
and `context` (a StartContext) holds what a start may use: the data, temperature and statistics of the fit, a
Debye temperature, a progress switch and where to tell what it chose. A name that is not in the table is a phonopy
file (`ForceConstantModel.set_from_phonopy`).

Adding a start is one function and one entry in STARTS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..covariance import UnstableError
from ..data import TDSData
from ..forward import tds_model
from ..structure import StructureError
from .objective import Objective, set_theta

if TYPE_CHECKING:
    from ..model import ForceConstantModel

# Debye temperatures (K) that `debye_temperature_from_data` tries for a spring start: 100 K to 1600 K, ×√2 apart
DEBYE_CANDIDATES = tuple(100.0 * 2 ** (k / 2) for k in range(9))
EDGE_STEPS = 4  # where the best is the first or last candidate, up to this many more steps of √2 beyond it


@dataclass(frozen=True)
class StartContext:
    """What a start may use besides the model.

    Attributes:
        data: the data to be fitted (the spring start chooses its Debye temperature on them), or None.
        temperature: K, the fit's temperature (None: the data's own).
        statistics: "quantum" | "classical".
        debye_temperature: K, the spring start's Debye temperature (None: chosen on the data, else 300 K).
        progress: progress bars (finite displacements of a calculator).
        say: where a start tells what it chose (e.g. print), or None: silent.
    """

    data: TDSData | None = None
    temperature: float | None = None
    statistics: str = "quantum"
    debye_temperature: float | None = None
    progress: bool = True
    say: Callable[[str], None] | None = None

    def tell(self, text: str) -> None:
        if self.say is not None:
            self.say(text)


def set_start(model: ForceConstantModel, start: str, context: StartContext | None = None) -> ForceConstantModel:
    """Set `model`'s θ from the start named `start` (a name of STARTS, "calculator:module.Class", or a phonopy file).

    Args:
        model: the model; its θ is replaced.
        start: the start's name, with its argument after a colon where it takes one.
        context: the data and options a start may use (None: none).

    Returns:
        The model, its θ set.

    Raises:
        ValueError: a start that cannot be made (e.g. EMT without parameters for an element, a calculator that
            cannot be imported).
        FileNotFoundError: neither a name of STARTS nor an existing phonopy file.
    """
    if not isinstance(start, str):
        raise TypeError(f"start must be a name of {tuple(STARTS)}, 'calculator:module.Class' or a phonopy file; got "
                        f"{type(start).__name__}")
    context = StartContext() if context is None else context
    name, _, argument = start.partition(":")
    if name in STARTS:
        return STARTS[name](model, argument, context)
    return model.set_from_phonopy(start)


def zero(model, argument: str, context: StartContext):
    """θ = 0 (unstable: for a test of the refusal, or a model whose θ is set otherwise)."""
    return model.set_parameters(np.zeros(model.n_params))


def springs(model, argument: str, context: StartContext):
    """Central springs between all pairs within the cutoff (`set_from_springs`), stable for any crystal, scaled to
    context.debye_temperature, or, where that is None and data are given, to the Debye temperature that fits the
    data best (`debye_temperature_from_data`)."""
    if context.debye_temperature is not None or context.data is None:
        return model.set_from_springs(context.debye_temperature or 300.0)
    chosen = debye_temperature_from_data(model, context.data, context.temperature, context.statistics)
    beyond = not DEBYE_CANDIDATES[0] <= chosen <= DEBYE_CANDIDATES[-1]
    context.tell(f"start: springs at a Debye temperature of {chosen:.0f} K, the best on the data of "
                 f"{DEBYE_CANDIDATES[0]:.0f}–{DEBYE_CANDIDATES[-1]:.0f} K" + (" and beyond" if beyond else ""))
    return model


def emt(model, argument: str, context: StartContext):
    """ASE's EMT (Ni, Cu, Pd, Ag, Pt, Au, Al) by finite displacements."""
    from ase.calculators.emt import EMT, parameters

    missing = sorted(set(model.unitcell.get_chemical_symbols()) - set(parameters))
    if missing:
        raise ValueError(f"--start emt: ASE's EMT does not cover {missing}; use --start calculator:module.Class "
                         "(any ASE calculator that does) or --start FILE (phonopy force constants)")
    return model.set_from_calculator(EMT(), progress=context.progress)


def calculator(model, argument: str, context: StartContext):
    """Any importable ASE calculator class built with no arguments ("calculator:module.Class"), e.g. a
    machine-learned potential, by finite displacements."""
    return model.set_from_calculator(calculator_of(argument), progress=context.progress)


def calculator_of(path: str):
    """An ASE calculator from "module.Class" (built with no arguments).

    Raises:
        ValueError: no module in the name, a class that cannot be imported, or a constructor that fails.
    """
    import importlib

    spec = f"calculator:{path}"
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


STARTS: dict[str, Callable] = {"springs": springs, "emt": emt, "zero": zero, "calculator": calculator}


def debye_temperature_from_data(model, data: TDSData, temperature: float | None = None, statistics: str = "quantum",
                                n_points: int = 2000) -> float:
    """The Debye temperature (K) whose spring start (`set_from_springs`) best fits `data`: the overall stiffness,
    the direction a fit from springs would otherwise crawl along first.

    Each candidate of DEBYE_CANDIDATES (and, where the best is at an edge, up to EDGE_STEPS more beyond it) is
    scored by the profiled χ² (scale fixed for absolute data, else free; a free background) of the gaussian model
    on a coarse periodic crystal (6³, refine=False) at up to `n_points` used points; `model` (a ForceConstantModel)
    is left with the best spring start. For MgB₂ (DFT truth) 800 K starts at χ²_red 712 where the default 300 K
    starts at 1.3·10⁵.

    Args:
        model (ForceConstantModel): the model to start; left at the best candidate's springs.
        data: the TDSData (its used points).
        temperature: K; None = the data's own.
        statistics: "quantum" | "classical".
        n_points: at most this many used points (evenly spaced) score the candidates.

    Returns:
        The best Debye temperature, K.
    """
    temperature = data.require_temperature(temperature)
    used = np.nonzero(np.asarray(data.mask, dtype=bool))[0]
    subset = data.select(used[np.linspace(0, len(used) - 1, min(n_points, len(used))).astype(int)])
    scale = "fixed" if data.absolute else "free"
    lowest = DEBYE_CANDIDATES[0]
    springs_theta = model.set_from_springs(lowest).theta.detach().cpu().numpy().copy()  # θ ∝ T_D²: one shape, scaled
    stiffness = np.ones_like(springs_theta)
    stiffness[model.basis.n_params:] = 0.0  # fitted Born charges (if any) keep their values
    objective = Objective(tds_model(model, temperature, statistics=statistics, grid=(6, 6, 6), refine=False),
                          subset, scale, "free", "chi2")

    def score(debye: float) -> float:
        try:
            with torch.no_grad():
                intensity = objective.intensity(springs_theta * (1 + stiffness * ((debye / lowest) ** 2 - 1)))
                return float(objective.value(objective.nuisance.model(intensity, objective.profile(intensity))))
        except UnstableError:
            return np.inf

    scores = {debye: score(debye) for debye in DEBYE_CANDIDATES}
    for edge, step in ((DEBYE_CANDIDATES[-1], np.sqrt(2)), (DEBYE_CANDIDATES[0], 1 / np.sqrt(2))):
        for _ in range(EDGE_STEPS):  # a best score at an edge of the candidates: go on past it while it falls
            if min(scores, key=scores.get) != edge or not np.isfinite(scores[edge]):
                break
            edge *= step
            scores[edge] = score(edge)
    scores = {debye: value for debye, value in scores.items() if np.isfinite(value)}
    if not scores:
        raise StructureError(f"central springs within the cutoff {model.cutoff:.3f} Å leave this crystal unstable at "
                             f"every Debye temperature tried ({DEBYE_CANDIDATES[0]:.0f}–{DEBYE_CANDIDATES[-1]:.0f} K): "
                             "use a larger cutoff (more shells), or start from a calculator or a phonopy file")
    best = min(scores, key=scores.get)
    set_theta(model, springs_theta * (1 + stiffness * ((best / lowest) ** 2 - 1)))
    return best
