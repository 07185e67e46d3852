"""ase_tds — fit interatomic force constants to X-ray thermal diffuse scattering."""

import importlib

# the public names and their modules, imported on first use (PEP 562): `import ase_tds.cli` stays light, so the
# command can answer --help and a Ctrl-C during its first seconds (torch's import) itself
_PUBLIC = {"TDSFitted": "calculator", "ThermalCovariance": "covariance", "UnstableError": "covariance",
           "TDSData": "data", "TDSError": "data", "write_training_data": "export", "MODELS": "forward",
           "ForwardModel": "forward", "simulate": "forward", "tds_model": "forward", "FitResult": "fitting",
           "Optimizer": "fitting", "fit": "fitting", "fit_series": "fitting", "SeriesResult": "fitting",
           "ForceConstantModel": "model",
           "PhonopyForceConstants": "phonopy_source", "DenseSampler": "sampling", "QSpaceSampler": "sampling",
           "ForceConstantSource": "source", "StructureError": "structure"}

__version__ = "0.1.0"
__all__ = ["DenseSampler", "FitResult", "ForceConstantModel", "ForceConstantSource", "Optimizer", "PhonopyForceConstants",
           "QSpaceSampler", "SeriesResult", "StructureError", "TDSData", "TDSError", "TDSFitted", "ForwardModel",
           "MODELS", "ThermalCovariance", "UnstableError", "fit", "fit_series", "simulate", "tds_model",
           "write_training_data", "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
