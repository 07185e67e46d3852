"""ase_tds — fit interatomic force constants to X-ray thermal diffuse scattering."""

from .calculator import TDSFitted
from .data import TDSData, simulate
from .export import write_training_data
from .fit import fit
from .model import ForceConstantModel
from .phonopy_source import PhonopyForceConstants
from .structure import StructureError
from .tds import TDSModel

__version__ = "0.1.0"
__all__ = ["ForceConstantModel", "PhonopyForceConstants", "StructureError", "TDSData", "TDSFitted", "TDSModel", "fit",
           "simulate", "write_training_data", "__version__"]
