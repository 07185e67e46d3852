"""A small torch interatomic potential standing in for a machine-learned one (issue 14's `calculator:` start).

`ToyPotential()` is an ASE calculator built with no arguments, as `--start calculator:module.Class` needs: energies
from torch, forces by autograd, like the ASE calculators of machine-learned potentials. Two classical forms with
published parameters, chosen by the species present:

- Si: Stillinger–Weber (Phys. Rev. B 31, 5262 (1985)): pair and three-body terms within a·σ = 3.77 Å;
- Na, Cl: Born–Mayer repulsion with the Fumi–Tosi parameters (J. Phys. Chem. Solids 25, 31 (1964); b = 0.211 eV,
  ρ = 0.317 Å, σ_Na = 1.170 Å, σ_Cl = 1.585 Å, Pauling factors 1.25, 1, 0.75) and the formal charges ±1 by the
  damped shifted-force Coulomb sum (Fennell & Gezelter, J. Chem. Phys. 124, 234104 (2006); α = 0.2 Å⁻¹, 12 Å).

Neither was fitted to the DFT force constants the benchmark recovers: a start as far from the truth as a
general-purpose potential is.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.neighborlist import neighbor_list

COULOMB = 14.399645  # e²/4πε₀ in eV·Å
SW = dict(epsilon=2.1683, sigma=2.0951, a=1.80, lam=21.0, gamma=1.20, A=7.049556277, B=0.6022245584)
FUMI_TOSI = dict(b=0.211, rho=0.317, radius={"Na": 1.170, "Cl": 1.585}, charge={"Na": 1.0, "Cl": -1.0},
                 pauling={("Na", "Na"): 1.25, ("Na", "Cl"): 1.0, ("Cl", "Na"): 1.0, ("Cl", "Cl"): 0.75})
DSF = dict(alpha=0.2, cutoff=12.0)


class ToyPotential(Calculator):
    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        species = set(self.atoms.get_chemical_symbols())
        if species <= {"Si"}:
            energy_of, cutoff = _stillinger_weber, SW["a"] * SW["sigma"]
        elif species <= {"Na", "Cl"}:
            energy_of, cutoff = _fumi_tosi, DSF["cutoff"]
        else:
            raise ValueError(f"ToyPotential covers Si and NaCl only, got {sorted(species)}")
        i, j, d = neighbor_list("ijD", self.atoms, cutoff)
        positions = torch.tensor(self.atoms.positions, dtype=torch.float64, requires_grad=True)
        shift = torch.as_tensor(d - (self.atoms.positions[j] - self.atoms.positions[i]))  # image offsets, fixed
        i, j = torch.as_tensor(i), torch.as_tensor(j)
        vectors = positions[j] - positions[i] + shift
        energy = energy_of(self.atoms, i, j, vectors)
        (grad,) = torch.autograd.grad(energy, positions)
        self.results = {"energy": float(energy.detach()), "forces": -grad.numpy()}


def _stillinger_weber(atoms, i, j, vectors):
    p = SW
    r = vectors.norm(dim=1)
    s = r / p["sigma"]
    cut = p["a"]
    pair = p["A"] * p["epsilon"] * (p["B"] * s**-4 - 1) * torch.exp(1 / (s - cut))
    energy = 0.5 * pair.sum()
    g = torch.exp(p["gamma"] / (s - cut))  # the radial factor of the three-body term per bond
    for centre in torch.unique(i):  # Σ over bond pairs (j < k) around each atom
        bonds = torch.nonzero(i == centre).flatten()
        u = vectors[bonds] / r[bonds, None]
        cos = u @ u.T
        upper = torch.triu(torch.ones_like(cos, dtype=torch.bool), diagonal=1)
        three = (cos + 1 / 3) ** 2 * g[bonds, None] * g[None, bonds]
        energy = energy + p["lam"] * p["epsilon"] * three[upper].sum()
    return energy


def _fumi_tosi(atoms, i, j, vectors):
    symbols = np.array(atoms.get_chemical_symbols())
    p, c = FUMI_TOSI, DSF
    r = vectors.norm(dim=1)
    a, b = symbols[i.numpy()], symbols[j.numpy()]
    sigma = torch.as_tensor([p["radius"][x] + p["radius"][y] for x, y in zip(a, b)])
    pauling = torch.as_tensor([p["pauling"][(x, y)] for x, y in zip(a, b)])
    qq = torch.as_tensor([p["charge"][x] * p["charge"][y] for x, y in zip(a, b)])
    repulsion = pauling * p["b"] * torch.exp((sigma - r) / p["rho"])
    alpha, rc = c["alpha"], c["cutoff"]
    erfc_rc = math.erfc(alpha * rc)
    slope = erfc_rc / rc**2 + 2 * alpha / math.sqrt(math.pi) * math.exp(-((alpha * rc) ** 2)) / rc
    coulomb = COULOMB * qq * (torch.erfc(alpha * r) / r - erfc_rc / rc + slope * (r - rc))
    return 0.5 * (repulsion + coulomb).sum()
