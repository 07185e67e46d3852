"""What keeps a refined potential a potential: its own energies and forces on reference configurations, computed once
with the pretrained weights, and an optional L2 pull of the weights to their pretrained values.

Reference configurations: a few thermal snapshots of the start (the start's force constants, `export.
thermal_configurations`, classical, at the data's temperature) and the start structure strained isotropically by
0 and ±`strain` (its equation of state near the minimum: the lattice constant and the bulk modulus).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

ENERGY_SIGMA = 0.002  # eV/atom: ±1 % strain of nickel costs ≈ 6 meV/atom, so its lattice constant stays within ~0.1 %
FORCE_SIGMA = 0.1  # eV/Å: loose; thermal forces are what a stiffer crystal must change (≈ 0.4 eV/Å rms at 300 K)


@dataclass
class Anchor:
    """The anchor penalty Σ_c ((E_c − E⁰_c)/(n_c·σ_E))² + Σ_c,i ((F_ci − F⁰_ci)/σ_F)² + Σ_w ((w − w⁰)/σ_w)².

    Attributes:
        configurations: the reference configurations (ase.Atoms).
        energies: E⁰ (B,) eV of the pretrained weights.
        forces: F⁰ [(N_c, 3) eV/Å] of the pretrained weights.
        energy_sigma: σ_E, eV/atom.
        force_sigma: σ_F, eV/Å (None: forces not anchored).
        weight_sigma: σ_w of the L2 pull to the pretrained weights (None: no pull).
        weights0: {name: pretrained weight (on the CPU)} of the refined weights (for the L2 pull).
    """

    configurations: list
    energies: torch.Tensor
    forces: list
    energy_sigma: float = ENERGY_SIGMA
    force_sigma: float | None = FORCE_SIGMA
    weight_sigma: float | None = None
    weights0: dict | None = None

    @classmethod
    def build(cls, potential, start_model, temperature: float, parameters: dict, n_snapshots: int = 3,
              snapshot_supercell=(2, 2, 2), strain: float = 0.01, seed: int = 0, **sigmas) -> Anchor:
        """The anchor of `potential` at its current (pretrained) weights.

        Args:
            potential (Potential): the potential, at its pretrained weights.
            start_model (ForceConstantModel): the start's force constants (thermal snapshots are drawn from them).
            temperature: K of the snapshots (classical).
            parameters: {name: weight} refined (their pretrained values are kept for the L2 pull).
            n_snapshots: thermal snapshots.
            snapshot_supercell: repetitions of the unit cell in a snapshot.
            strain: the isotropic strain of the strained cells (±).
            seed: seed of the snapshots.
            **sigmas: energy_sigma (eV/atom), force_sigma (eV/Å or None), weight_sigma (or None).
        """
        from ..export import thermal_configurations

        unitcell = start_model.unitcell
        configurations = []
        for scale in (1.0 - strain, 1.0, 1.0 + strain):
            strained = Atoms(unitcell.numbers, cell=unitcell.cell[:] * scale, scaled_positions=unitcell.get_scaled_positions(),
                             pbc=True)
            configurations.append(strained)
        frames = thermal_configurations(start_model, snapshot_supercell, temperature, n_snapshots,
                                        statistics="classical", seed=seed, sampler="dense", progress=False)
        configurations += [Atoms(f.numbers, cell=f.cell[:], positions=f.positions, pbc=True) for f in frames]
        energies, forces = potential.energy_forces(configurations)
        weights0 = {name: p.detach().to("cpu", copy=True) for name, p in parameters.items()}
        return cls(configurations, energies, forces, weights0=weights0, **sigmas)

    def penalty(self, potential, parameters: dict) -> torch.Tensor:
        """The anchor penalty (a scalar tensor, differentiable in the weights) at the potential's current weights."""
        energies, forces = potential.energy_forces(self.configurations, create_graph=True)
        n_atoms = torch.tensor([len(c) for c in self.configurations], dtype=torch.float64)
        total = (((energies - self.energies) / (n_atoms * self.energy_sigma)) ** 2).sum()
        if self.force_sigma is not None:
            total = total + sum((((f - f0) / self.force_sigma) ** 2).sum() for f, f0 in zip(forces, self.forces))
        if self.weight_sigma is not None:
            total = total + sum((((p.to("cpu", torch.float64) - self.weights0[name].to(torch.float64))
                                  / self.weight_sigma) ** 2).sum() for name, p in parameters.items())
        return total

    def drift(self, potential) -> dict:
        """How far the potential's energies (meV/atom) and forces (meV/Å) moved from the pretrained ones, per kind of
        reference configuration: rms and largest |change|."""
        energies, forces = potential.energy_forces(self.configurations)
        per_atom = ((energies - self.energies) / torch.tensor([len(c) for c in self.configurations])).numpy() * 1e3
        force_change = np.concatenate([(f - f0).numpy().ravel() for f, f0 in zip(forces, self.forces)]) * 1e3
        force_scale = np.concatenate([f0.numpy().ravel() for f0 in self.forces[3:]]) * 1e3
        return {"energy_strained_meV_per_atom": per_atom[:3].tolist(),
                "energy_snapshots_meV_per_atom": per_atom[3:].tolist(),
                "energy_rms_meV_per_atom": float(np.sqrt(np.mean(per_atom**2))),
                "force_rms_meV_per_A": float(np.sqrt(np.mean(force_change**2))),
                "force_max_meV_per_A": float(np.abs(force_change).max()),
                "snapshot_force_rms_meV_per_A": float(np.sqrt(np.mean(force_scale**2)))}
