"""CHGNet (Deng et al., Nat. Mach. Intell. 5, 1031 (2023)) as a Potential: pretrained or a saved file.

Refined in float64 (its composition model, a per-structure energy offset that no force sees, stays in float32, as
CHGNet casts its input): in float32 the forces of a 0.01 Å displacement carry 1e-4 relative round-off (6e-6 of
0.06 eV/Å on nickel), which ended the line searches over all of CHGNet's weights at χ²_red 7.8. Its own calculator
(`calculator`, and the file `save` writes) is float32, as CHGNet runs. Its forward always keeps the graph of the
forces (it autodifferentiates the energy with create_graph=True), so one call gives forces that are differentiable
in the weights.
"""

from __future__ import annotations

import contextlib
import io

import torch
from ase import Atoms

from . import Potential, missing_package


class CHGNetPotential(Potential):
    """CHGNet's weights as a Potential.

    Default refined layers: `mlp`, the readout (atom features → site energy, 12 545 weights of 412 525): the last
    layers, whose change moves force constants and energies without relearning the message passing (docs/refine.md).

    Args:
        source: None (the pretrained 0.3.0), a pretrained name ("0.3.0", "0.2.0", "r2scan"), or a file written by
            `save` (or by CHGNet's trainer).
    """

    name = "chgnet"
    default_layers = ("mlp",)

    def __init__(self, source: str | None = None):
        try:
            from chgnet.model import CHGNet
        except ImportError as err:
            raise missing_package("chgnet", err) from err
        with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its size and device
            if source is None or source in ("0.3.0", "0.2.0", "r2scan"):
                self._model = CHGNet.load(model_name=source or "0.3.0", use_device="cpu", verbose=False)
            else:
                self._model = CHGNet.from_file(str(source))
        self._model.eval()
        self._model.double()
        self._model.composition_model.float()
        self._graphs = {}  # the crystal graphs of configurations seen, by their geometry (they never change)

    @property
    def module(self) -> torch.nn.Module:
        return self._model

    def _graph(self, atoms: Atoms):
        key = (atoms.numbers.tobytes(), atoms.positions.tobytes(), atoms.cell[:].tobytes())
        if key not in self._graphs:
            from pymatgen.io.ase import AseAtomsAdaptor

            graph = self._model.graph_converter(AseAtomsAdaptor.get_structure(atoms))
            for name, value in vars(graph).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    setattr(graph, name, value.double())
            self._graphs[key] = graph
        return self._graphs[key]

    def energy_forces(self, configurations: list[Atoms], create_graph: bool = False):
        graphs = [self._graph(atoms).to(self.device) for atoms in configurations]
        with torch.enable_grad():
            prediction = self._model(graphs, task="ef")
        n_atoms = torch.tensor([len(atoms) for atoms in configurations], dtype=torch.float64)
        energies = prediction["e"].to("cpu", torch.float64) * n_atoms  # CHGNet's energy is per atom
        forces = [f.to("cpu", torch.float64) for f in prediction["f"]]
        if not create_graph:
            return energies.detach(), [f.detach() for f in forces]
        return energies, forces

    def save(self, path) -> None:
        torch.save({"model": self._model.as_dict()}, path)  # what CHGNet.from_file reads

    def calculator(self, path=None):
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        with contextlib.redirect_stdout(io.StringIO()):  # float32, as CHGNet runs
            model = CHGNet.from_dict(self._model.as_dict()) if path is None else CHGNet.from_file(str(path))
            return CHGNetCalculator(model=model, use_device=str(self.device))
