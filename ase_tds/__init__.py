"""ase_tds — fit interatomic force constants to X-ray thermal diffuse scattering."""

from .calculator import TDSFitted
from .covariance import ThermalCovariance, UnstableError
from .data import TDSData, TDSError, simulate
from .export import write_training_data
from .fit import FitResult, Optimizer, fit
from .model import ForceConstantModel
from .phonopy_source import PhonopyForceConstants
from .sampling import DenseSampler, QSpaceSampler
from .source import ForceConstantSource
from .structure import StructureError
from .tds import TDSModel

__version__ = "0.1.0"
__all__ = ["DenseSampler", "FitResult", "ForceConstantModel", "ForceConstantSource", "Optimizer", "PhonopyForceConstants",
           "QSpaceSampler", "StructureError", "TDSData", "TDSError", "TDSFitted", "TDSModel", "ThermalCovariance",
           "UnstableError", "fit", "simulate", "write_training_data", "__version__"]
