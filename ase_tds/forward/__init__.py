"""Forward models: I(Q) in e.u. per atom from force constants, one protocol (`ForwardModel`) and one table of named
models (`MODELS`): "one-phonon", "gaussian" (all orders) and "sampling" (docs/theory.md, "Forward models")."""

from .base import ForwardModel
from .gaussian import GaussianModel
from .one_phonon import OnePhononModel
from .sampled import SampledModel
from .simulate import points_in_sphere, simulate
from .table import MODELS, from_settings, model_class, tds_model

__all__ = ["ForwardModel", "GaussianModel", "OnePhononModel", "SampledModel", "MODELS", "model_class", "tds_model",
           "from_settings", "simulate", "points_in_sphere"]
