"""Potentials whose own weights `ase_tds.refine` fits: one protocol (`Potential`) and one table (`POTENTIALS`).

A potential is a torch model of the energy (eV) of a configuration, forces (eV/Å) by autograd. The protocol asks for
- `module`: its torch.nn.Module (the weights are `module`'s parameters);
- `parameters(select)`: the trainable weights, all or those whose names start with one of `select` (None: the
  adapter's `default_layers`);
- `energy_forces(configurations, create_graph)`: energies (B,) eV and forces, one (N_b, 3) eV/Å per configuration,
  computed on the potential's `device` and returned as float64 CPU tensors, differentiable in the weights when
  create_graph is true;
- `to(device)` (given): its weights moved to a torch device;
- `save(path)`: the potential in its own format, one file, loadable by `calculator(path)`;
- `calculator()`: its own ASE calculator at the current weights (phonons, MD, equation of state).

Adding a potential is one new file with such a class and one entry in POTENTIALS; "module:Class" (or
"module.Class") names any importable torch.nn.Module built with no arguments whose forward(positions (N, 3) Å,
atoms) gives the energy in eV (`TorchModulePotential`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import torch
from ase import Atoms


class Potential(ABC):
    """A torch interatomic potential as `refine` sees it (module docstring).

    Attributes:
        name: the table name ("chgnet", "sevenn") or "module:Class".
        default_layers: name prefixes of the weights refined by default (see docs/refine.md).
        dtype: the torch dtype it computes in (float32 for CHGNet and SevenNet; results are cast to float64).
        device: the torch device it computes on (`to`); its results are on the CPU.
    """

    name: str = ""
    default_layers: tuple[str, ...] = ()
    device: torch.device = torch.device("cpu")

    def to(self, device) -> "Potential":
        """Move the weights to `device` (torch.device or "cpu", "cuda", "cuda:N"), where it then computes; returns
        itself."""
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The torch.nn.Module holding the weights."""

    @abstractmethod
    def energy_forces(self, configurations: list[Atoms], create_graph: bool = False):
        """(energies (B,) eV float64, [forces (N_b, 3) eV/Å float64 per configuration]), on the CPU (computed on
        `device`); with create_graph the forces keep their graph (differentiable in the weights), else everything is
        detached."""

    @abstractmethod
    def save(self, path) -> None:
        """Write the potential at its current weights to the file `path` in its own format."""

    @abstractmethod
    def calculator(self, path=None):
        """Its own ASE calculator: at the current weights, or (path) of a file `save` wrote."""

    def parameters(self, select=None) -> dict[str, torch.nn.Parameter]:
        """{name: weight} refined: those whose names start with one of `select` (None: `default_layers`; "all" or
        ["all"]: every weight of the module).

        Raises:
            ValueError: a prefix that names no weight (the message lists the module's top-level layers).
        """
        named = dict(self.module.named_parameters())
        if select in ("all", ["all"], ("all",)) or (select is None and not self.default_layers):
            return named
        prefixes = tuple(self.default_layers if select is None else select)
        chosen = {name: p for name, p in named.items() if name.startswith(prefixes)}
        unknown = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in named)]
        if unknown or not chosen:
            layers = sorted({name.split(".")[0] for name in named})
            raise ValueError(f"no weight of the {self.name} potential is named {', '.join(unknown or prefixes)}*; its "
                             f"layers are {', '.join(layers)} (or give 'all')")
        return chosen


def check_potential(potential: Potential, atoms: Atoms) -> None:
    """The conformance check: energies (1,) and forces (N, 3), finite, forces differentiable in the weights.

    Raises:
        TypeError: a potential that breaks the protocol (named in the message).
    """
    energies, forces = potential.energy_forces([atoms], create_graph=True)
    if energies.shape != (1,) or len(forces) != 1 or tuple(forces[0].shape) != (len(atoms), 3):
        raise TypeError(f"{potential.name}: energy_forces must give energies (B,) and forces [(N, 3)], got "
                        f"{tuple(energies.shape)} and {[tuple(f.shape) for f in forces]}")
    if not (torch.isfinite(energies).all() and torch.isfinite(forces[0]).all()):
        raise TypeError(f"{potential.name}: energies or forces of {atoms.get_chemical_formula()} are not finite")
    if not forces[0].requires_grad:
        raise TypeError(f"{potential.name}: its forces do not depend on its weights (no graph kept with "
                        "create_graph=True); the forces must come from autograd of the energy with create_graph")


def _chgnet(argument: str) -> Potential:
    from .chgnet import CHGNetPotential

    return CHGNetPotential(argument or None)


def _sevenn(argument: str) -> Potential:
    from .sevenn import SevenNetPotential

    return SevenNetPotential(argument or None)


# name → builder(argument after the colon: a model name or a file, "" for the pretrained default)
POTENTIALS = {"chgnet": _chgnet, "sevenn": _sevenn}


def load_potential(spec) -> Potential:
    """The Potential named `spec`: a Potential (returned as it is), a torch.nn.Module (`TorchModulePotential`),
    "chgnet" | "sevenn" (pretrained; "chgnet:FILE" | "sevenn:FILE" a saved one), or "module:Class" /
    "module.Class" (an importable torch.nn.Module built with no arguments).

    Raises:
        ValueError: a name that is neither in POTENTIALS nor an importable nn.Module class, or a package that is not
            installed (the message says which to install).
    """
    from .torch_module import TorchModulePotential

    if isinstance(spec, Potential):
        return spec
    if isinstance(spec, torch.nn.Module):
        return TorchModulePotential(spec)
    if not isinstance(spec, str):
        raise TypeError(f"potential must be a name ({', '.join(POTENTIALS)}, module:Class), a Potential or a "
                        f"torch.nn.Module; got {type(spec).__name__}")
    name, _, argument = spec.partition(":")
    if name in POTENTIALS:
        return POTENTIALS[name](argument)
    module_name, class_name = (name, argument) if argument else spec.rpartition(".")[::2]
    if not module_name or not class_name:
        raise ValueError(f"--potential {spec}: give one of {', '.join(POTENTIALS)} or module:Class (a torch.nn.Module "
                         "whose forward(positions, atoms) is the energy)")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--potential {spec}: cannot import {class_name} from {module_name} ({err}); check the "
                         "name and that the module is on the Python path") from err
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"--potential {spec}: {class_name} is not a torch.nn.Module class")
    return TorchModulePotential(cls(), name=f"{module_name}:{class_name}")


def missing_package(package: str, err: Exception) -> ValueError:
    """The error for an adapter whose package is not installed."""
    return ValueError(f"the {package} potential needs the package {package} ({err}); install it with "
                      f"`pip install {package}` or `pip install ase_tds[mlip]`")


__all__ = ["POTENTIALS", "Potential", "check_potential", "load_potential"]
