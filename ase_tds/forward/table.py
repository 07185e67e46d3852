"""The forward models by name: the one table that `fit`, `simulate`, the command line's choices and fit.json read.

Adding a forward model is one new file (a `ForwardModel` subclass) and one entry here.
"""

from __future__ import annotations

import inspect
import logging

from .base import ForwardModel
from .fft import FFTModel
from .gaussian import GaussianModel
from .one_phonon import OnePhononModel
from .sampled import SampledModel
from .voxels import volume_grid

MODELS: dict[str, type[ForwardModel]] = {
    "one-phonon": OnePhononModel,
    "gaussian": GaussianModel,
    "sampling": SampledModel,
    "fft": FFTModel,
}


def model_class(method: str) -> type[ForwardModel]:
    """The forward model named `method`.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if method not in MODELS:
        raise ValueError(f"method must be one of {tuple(MODELS)}, got {method!r}")
    return MODELS[method]


def tds_model(force_constants, temperature: float, method: str = "gaussian", statistics: str = "quantum",
              **options) -> ForwardModel:
    """The forward model `method` of `force_constants` at `temperature`: I(Q) in e.u./atom (`ForwardModel`).

    Args:
        force_constants (ForceConstantSource): a ForceConstantModel (θ trainable) or PhonopyForceConstants.
        temperature: K (> 0, or 0 with quantum statistics).
        method: a name in `MODELS`: "gaussian" (all orders, converged by default), "one-phonon", "sampling" or "fft"
            (all orders at points on a regular grid).
        statistics: "classical" | "quantum".
        **options (Any): the model's own keyword arguments (form_factors, chunk; grid, refine, accuracy, q_max for
            "gaussian"; dw_mesh (and grid) for "one-phonon"; sampler for "sampling"; voxels, tail for "fft"). Options
            that only other models take are ignored, so that one set of discretisation options serves several models.
            "gaussian" with `voxels` (the Cartesian Q of the data, as `fit` and `simulate` give them) that lie on a
            regular hkl grid (`voxels.volume_grid`), and no `grid` of its own, takes the FFT route: the model "fft",
            the same crystal's exact all-order intensity at every voxel at once (a log line says so; its settings
            record it).

    Returns:
        The model.

    Raises:
        ValueError: an unknown method or statistics, an option that no model takes, or a value the model cannot use.
        UnstableError: choosing the gaussian model's grid met dynamically unstable force constants.
    """
    cls = model_class(method)
    known = {name for model in MODELS.values() for name in _keywords(model)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"no forward model takes {', '.join(unknown)}; the options are {', '.join(sorted(known))}")
    if method == "gaussian" and options.get("grid") is None and options.get("voxels") is not None:
        grid = volume_grid(options["voxels"], force_constants.primitive.cell[:])
        if grid is not None:
            cls, options = FFTModel, dict(options, voxel_grid=grid)
            logging.getLogger(__name__).info("the %d points lie on a regular grid (the reciprocal lattice of a %s "
                                             "crystal): the all-order model takes the fft route",
                                             len(options["voxels"]), "×".join(map(str, grid)))
    own = _keywords(cls)
    return cls(force_constants, temperature, statistics=statistics,
               **{key: value for key, value in options.items() if key in own})


def _keywords(cls) -> set[str]:
    """The keyword options of a model's constructor (besides force constants, temperature and statistics)."""
    return set(inspect.signature(cls.__init__).parameters) - {"self", "force_constants", "temperature", "statistics"}


def from_settings(force_constants, settings: dict, **options) -> ForwardModel:
    """The forward model that a record's `settings` describe (`ForwardModel.settings`, fit.json's "settings").

    Args:
        force_constants (ForceConstantSource): the force constants to put in it.
        settings: with "method", "statistics", "temperature" and the model's own settings.
        **options (Any): keyword arguments over those of `settings`.

    Returns:
        The model.
    """
    return model_class(settings["method"]).from_settings(force_constants, settings, **options)
