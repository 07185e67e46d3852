"""SevenNet (Park et al., J. Chem. Theory Comput. 20, 4857 (2024)) as a Potential: pretrained or a checkpoint.

SevenNet computes in float32; its energies and forces are cast to float64 here. Its force module keeps the graph of
the forces only in training mode, which `energy_forces(create_graph=True)` switches on for that call (the model has
no dropout or batch normalisation, so nothing else changes).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from ase import Atoms

from . import Potential, missing_package


class SevenNetPotential(Potential):
    """SevenNet's weights as a Potential.

    Default refined layers: the last interaction block's output and the readout, i.e. the weights after the last
    convolution (`reduce_input_to_hidden`, `reduce_hidden_to_energy`, `rescale_atomic_energy`): the last layers
    (docs/refine.md).

    Args:
        source: None (the pretrained SevenNet-0), a pretrained name ("7net-0", "7net-l3i5", ...) or a checkpoint
            file (`save` writes one).
    """

    name = "sevenn"
    default_layers = ("reduce_input_to_hidden", "reduce_hidden_to_energy", "rescale_atomic_energy")

    def __init__(self, source: str | None = None):
        try:
            from sevenn.util import load_checkpoint, pretrained_name_to_path
        except ImportError as err:
            raise missing_package("sevenn", err) from err
        source = source or "7net-0"
        with contextlib.suppress(ValueError):
            source = pretrained_name_to_path(source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._checkpoint = load_checkpoint(source)
            self._model = self._checkpoint.build_model()
        self._model.set_is_batch_data(False)
        self._model.eval()
        self.cutoff = float(self._checkpoint.config["cutoff"])
        self._graphs = {}  # the input graphs of configurations seen, by their geometry

    @property
    def module(self) -> torch.nn.Module:
        return self._model

    def _graph(self, atoms: Atoms):
        key = (atoms.numbers.tobytes(), atoms.positions.tobytes(), atoms.cell[:].tobytes())
        if key not in self._graphs:
            from sevenn.train.dataload import unlabeled_atoms_to_graph

            self._graphs[key] = unlabeled_atoms_to_graph(atoms, self.cutoff, with_shift=False)
        from sevenn.atom_graph_data import AtomGraphData

        # a fresh input on the device: the model writes into it
        return AtomGraphData.from_numpy_dict(self._graphs[key]).to(self.device)

    def energy_forces(self, configurations: list[Atoms], create_graph: bool = False):
        import sevenn._keys as KEY

        energies, forces = [], []
        self._model.train(create_graph)  # the force module's create_graph follows `training`
        try:
            for atoms in configurations:
                with torch.enable_grad():
                    output = self._model(self._graph(atoms))
                energies.append(output[KEY.PRED_TOTAL_ENERGY].reshape(()).to("cpu", torch.float64))
                forces.append(output[KEY.PRED_FORCE][:len(atoms)].to("cpu", torch.float64))
        finally:
            self._model.eval()
        energies = torch.stack(energies)
        if not create_graph:
            return energies.detach(), [f.detach() for f in forces]
        return energies, forces

    def save(self, path) -> None:
        import sevenn

        checkpoint = self._checkpoint.get_checkpoint_dict()
        checkpoint["model_state_dict"] = self._model.state_dict()
        # the state dict is in this version's layout: stamped so, SevenNet does not convert an old checkpoint's again
        checkpoint["config"]["version"] = sevenn.__version__
        torch.save(checkpoint, path)

    def calculator(self, path=None):
        from sevenn.calculator import SevenNetCalculator

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path is not None:
                return SevenNetCalculator(str(path), device=str(self.device))
            return SevenNetCalculator(self._model, file_type="model_instance", device=str(self.device))
