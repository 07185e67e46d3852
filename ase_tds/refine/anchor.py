"""What keeps a refined potential a potential: its own energies and forces on reference configurations, computed once
with the pretrained weights, and an optional L2 pull of the weights to their pretrained values.

Reference configurations: a few thermal snapshots of the start (the start's force constants, `export.
thermal_configurations`, classical, at the data's temperature) and the structure at the pretrained potential's own
equilibrium volume strained isotropically by 0 and ±`strain` (its equation of state at the minimum: the lattice
constant and the bulk modulus).

The lattice constant has a term of its own: energies within σ_E leave the slope of E(strain), hence the equilibrium
lattice constant, free to move by ~σ_E/(strain·curvature) (0.1–0.9 % in practice), and the data pull on it through
the weights they share with the force constants. The term holds the vertex of the parabola through the three strained
energies, the isotropic strain at which the potential is at rest, to its pretrained value within σ_a; centred on the
pretrained minimum, the vertex is the minimum to second order in its move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

ENERGY_SIGMA = 0.002  # eV/atom: ±1 % strain of nickel costs ≈ 6 meV/atom; the bulk modulus may follow the data
FORCE_SIGMA = 0.1  # eV/Å: loose; thermal forces are what a stiffer crystal must change (≈ 0.4 eV/Å rms at 300 K)
LATTICE_SIGMA = 2e-4  # relative: the data cannot see the lattice constant, so it is all but fixed (0.5 % costs 625)


@dataclass
class Anchor:
    """The anchor penalty Σ_c ((E_c − E⁰_c)/(n_c·σ_E))² + Σ_c,i ((F_ci − F⁰_ci)/σ_F)² + ((ε₀ − ε₀⁰)/σ_a)²
    + Σ_w ((w − w⁰)/σ_w)², ε₀ the equilibrium isotropic strain (`equilibrium_strain`).

    Attributes:
        configurations: the reference configurations (ase.Atoms).
        energies: E⁰ (B,) eV of the pretrained weights.
        forces: F⁰ [(N_c, 3) eV/Å] of the pretrained weights.
        energy_sigma: σ_E, eV/atom.
        force_sigma: σ_F, eV/Å (None: forces not anchored).
        lattice_sigma: σ_a, relative, of the equilibrium lattice constant (None: not held beyond the energies).
        weight_sigma: σ_w of the L2 pull to the pretrained weights (None: no pull).
        weights0: {name: pretrained weight (on the CPU)} of the refined weights (for the L2 pull).
        strain: the isotropic strain of configurations 0 and 2 (−, +); configuration 1 is unstrained.
    """

    configurations: list
    energies: torch.Tensor
    forces: list
    energy_sigma: float = ENERGY_SIGMA
    force_sigma: float | None = FORCE_SIGMA
    lattice_sigma: float | None = LATTICE_SIGMA
    weight_sigma: float | None = None
    weights0: dict | None = None
    strain: float = 0.01

    @classmethod
    def build(cls, potential, start_model, temperature: float, parameters: dict, n_snapshots: int = 3,
              snapshot_supercell=(2, 2, 2), strain: float = 0.01, lattice_scale: float = 1.0, seed: int = 0,
              **sigmas) -> Anchor:
        """The anchor of `potential` at its current (pretrained) weights.

        Args:
            potential (Potential): the potential, at its pretrained weights.
            start_model (ForceConstantModel): the start's force constants (thermal snapshots are drawn from them).
            temperature: K of the snapshots (classical).
            parameters: {name: weight} refined (their pretrained values are kept for the L2 pull).
            n_snapshots: thermal snapshots.
            snapshot_supercell: repetitions of the unit cell in a snapshot.
            strain: the isotropic strain of the strained cells (±).
            lattice_scale: the pretrained potential's equilibrium a₀/a of the start's unit cell (`drift.
                equation_of_state`): the strained cells' centre.
            seed: seed of the snapshots.
            **sigmas: energy_sigma (eV/atom), force_sigma (eV/Å or None), lattice_sigma (relative, or None),
                weight_sigma (or None).
        """
        from ..export import thermal_configurations

        unitcell = start_model.unitcell
        configurations = []
        for scale in lattice_scale * np.array([1.0 - strain, 1.0, 1.0 + strain]):
            strained = Atoms(unitcell.numbers, cell=unitcell.cell[:] * scale, scaled_positions=unitcell.get_scaled_positions(),
                             pbc=True)
            configurations.append(strained)
        frames = thermal_configurations(start_model, snapshot_supercell, temperature, n_snapshots,
                                        statistics="classical", seed=seed, sampler="dense", progress=False)
        configurations += [Atoms(f.numbers, cell=f.cell[:], positions=f.positions, pbc=True) for f in frames]
        energies, forces = potential.energy_forces(configurations)
        weights0 = {name: p.detach().to("cpu", copy=True) for name, p in parameters.items()}
        return cls(configurations, energies, forces, weights0=weights0, strain=strain, **sigmas)

    def equilibrium_strain(self, energies: torch.Tensor) -> torch.Tensor:
        """ε₀ (0-dim): the isotropic strain at the vertex of the parabola through the energies (B,) eV of the three
        strained configurations, s·(E₋ − E₊)/(2(E₋ − 2E₀ + E₊)); the curvature kept ≥ a tenth of the pretrained one."""
        minus, zero, plus = energies[:3]
        curvature = torch.clamp(minus - 2 * zero + plus, min=0.1 * float(self.energies[0] - 2 * self.energies[1]
                                                                          + self.energies[2]))
        return self.strain * (minus - plus) / (2 * curvature)

    def penalty(self, potential, parameters: dict) -> torch.Tensor:
        """The anchor penalty (a scalar tensor, differentiable in the weights) at the potential's current weights."""
        energies, forces = potential.energy_forces(self.configurations, create_graph=True)
        n_atoms = torch.tensor([len(c) for c in self.configurations], dtype=torch.float64)
        total = (((energies - self.energies) / (n_atoms * self.energy_sigma)) ** 2).sum()
        if self.force_sigma is not None:
            total = total + sum((((f - f0) / self.force_sigma) ** 2).sum() for f, f0 in zip(forces, self.forces))
        if self.lattice_sigma is not None:
            moved = self.equilibrium_strain(energies) - self.equilibrium_strain(self.energies)
            total = total + (moved / self.lattice_sigma) ** 2
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
                "lattice_vertex_moved_percent": float(100 * (self.equilibrium_strain(energies)
                                                             - self.equilibrium_strain(self.energies))),
                "snapshot_force_rms_meV_per_A": float(np.sqrt(np.mean(force_scale**2)))}
