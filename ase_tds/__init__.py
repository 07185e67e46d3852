"""ase_tds — fit interatomic force constants to X-ray thermal diffuse scattering."""

from .data import TDSData
from .model import ForceConstantModel
from .structure import StructureError
from .tds import TDSModel

__version__ = "0.1.0"
__all__ = ["ForceConstantModel", "StructureError", "TDSData", "TDSModel", "__version__"]
