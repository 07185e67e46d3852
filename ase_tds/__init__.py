"""ase_tds — fit interatomic force constants to X-ray thermal diffuse scattering."""

from .model import ForceConstantModel
from .structure import StructureError

__version__ = "0.1.0"
__all__ = ["ForceConstantModel", "StructureError", "__version__"]
