"""Forward models: I(Q) in e.u. per atom from force constants, one protocol (`ForwardModel`) and one table of named
models (`MODELS`): "one-phonon", "gaussian" (all orders), "sampling" and "fft" (all orders at points on a regular
grid) (docs/theory.md, "Forward models")."""

from .base import ForwardModel
from .fft import FFTModel
from .gaussian import GaussianModel
from .one_phonon import OnePhononModel
from .sampled import SampledModel
from .simulate import points_in_sphere, simulate
from .table import MODELS, from_settings, model_class, tds_model

__all__ = ["ForwardModel", "FFTModel", "GaussianModel", "OnePhononModel", "SampledModel", "MODELS", "model_class",
           "tds_model", "from_settings", "simulate", "points_in_sphere"]
