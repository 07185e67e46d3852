"""ase_tds — fit interatomic force constants to X-ray thermal diffuse scattering."""

from .calculator import TDSFitted
from .data import TDSData, simulate
from .fit import fit
from .model import ForceConstantModel
from .structure import StructureError
from .tds import TDSModel

__version__ = "0.1.0"
__all__ = ["ForceConstantModel", "StructureError", "TDSData", "TDSFitted", "TDSModel", "fit", "simulate", "__version__"]
