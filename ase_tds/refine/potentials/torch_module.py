"""Any torch.nn.Module whose forward(positions (N, 3) Å, atoms) is the energy (eV): forces by autograd."""

from __future__ import annotations

import importlib

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from . import Potential


class TorchModulePotential(Potential):
    """A torch.nn.Module energy model as a Potential: energy = module(positions, atoms), forces = −∂E/∂positions.

    The module computes in its own dtype on `device`; positions are given in the dtype of its first weight. `save` writes
    {"class": "module:Class", "state_dict"} with torch.save; `TorchModulePotential.from_file` and
    `calculator(path)` read it back (the class must be importable and built with no arguments).

    Args:
        module: the torch.nn.Module.
        name: "module:Class" of its class (None: from the class itself).
    """

    default_layers = ()  # every weight: a hand-written energy has few

    def __init__(self, module: torch.nn.Module, name: str | None = None):
        self._module = module
        cls = type(module)
        self.name = name or f"{cls.__module__}:{cls.__qualname__}"

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    @property
    def dtype(self) -> torch.dtype:
        first = next(self._module.parameters(), None)
        return torch.float64 if first is None else first.dtype

    def energy_forces(self, configurations: list[Atoms], create_graph: bool = False):
        energies, forces = [], []
        for atoms in configurations:
            with torch.enable_grad():
                positions = torch.tensor(atoms.positions, dtype=self.dtype, device=self.device, requires_grad=True)
                energy = self._module(positions, atoms)
                (grad,) = torch.autograd.grad(energy, positions, create_graph=create_graph)
            energies.append(energy.to("cpu", torch.float64))
            forces.append(-grad.to("cpu", torch.float64))
        energies = torch.stack(energies)
        if not create_graph:
            return energies.detach(), [f.detach() for f in forces]
        return energies, forces

    def save(self, path) -> None:
        torch.save({"class": self.name, "state_dict": self._module.state_dict()}, path)

    @classmethod
    def from_file(cls, path) -> TorchModulePotential:
        """The potential `save` wrote at `path`.

        Raises:
            ValueError: a file without "class" and "state_dict", or a class that cannot be imported.
        """
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(saved, dict) or "class" not in saved or "state_dict" not in saved:
            raise ValueError(f"{path}: not a potential saved by ase_tds (no 'class' and 'state_dict')")
        module_name, _, class_name = saved["class"].partition(":")
        try:
            module = getattr(importlib.import_module(module_name), class_name)()
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{path}: its class {saved['class']} cannot be imported ({err}); put its module on the "
                             "Python path") from err
        module.load_state_dict(saved["state_dict"])
        return cls(module, name=saved["class"])

    def calculator(self, path=None):
        return ModuleCalculator(self if path is None else TorchModulePotential.from_file(path))


class ModuleCalculator(Calculator):
    """The ASE calculator of a TorchModulePotential: energy (eV) and forces (eV/Å)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, potential: TorchModulePotential, **kwargs):
        super().__init__(**kwargs)
        self.potential = potential

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energies, forces = self.potential.energy_forces([self.atoms])
        self.results = {"energy": float(energies[0]), "forces": np.asarray(forces[0].numpy())}
