"""A torch.nn.Module pair potential for the refinement tests: forward(positions (N, 3) Å, atoms) → energy (eV).

Morse pairs E = ½ Σ_{i≠j} D [(1 − e^{−α(r−r₀)})² − 1] s(r), the cosine taper s from 1 at 3.7 Å to 0 at 4.2 Å: fcc
nickel's first two shells (2.49, 3.52 Å) and none beyond (4.31 Å). D, α, r₀ are its three weights (float64).
`StifferMorse` is the same form with other weights: the "truth" a refinement of `MorsePotential` recovers.
The neighbour pairs of a geometry are found once and kept (a refinement evaluates the same configurations again and
again).
"""

from __future__ import annotations

import math

import torch
from ase.neighborlist import neighbor_list

TAPER = (3.7, 4.2)  # Å


class MorsePotential(torch.nn.Module):
    def __init__(self, depth: float = 0.35, alpha: float = 1.4, r0: float = 2.6):
        super().__init__()
        self.depth = torch.nn.Parameter(torch.tensor(depth, dtype=torch.float64))
        self.alpha = torch.nn.Parameter(torch.tensor(alpha, dtype=torch.float64))
        self.r0 = torch.nn.Parameter(torch.tensor(r0, dtype=torch.float64))
        self._pairs = {}  # geometry → (i, j, image offsets (P, 3) Å)

    def pairs(self, atoms):
        """The pairs i, j (P,) within the taper's end and their image offsets (P, 3) Å of `atoms`' geometry."""
        key = (atoms.numbers.tobytes(), atoms.positions.tobytes(), atoms.cell[:].tobytes())
        if key not in self._pairs:
            i, j, d = neighbor_list("ijD", atoms, TAPER[1])
            self._pairs[key] = (i, j, torch.as_tensor(d - (atoms.positions[j] - atoms.positions[i])))
        return self._pairs[key]

    def forward(self, positions: torch.Tensor, atoms) -> torch.Tensor:
        i, j, shift = self.pairs(atoms)
        r = (positions[j] - positions[i] + shift.to(positions.device)).norm(dim=1)
        x = ((r - TAPER[0]) / (TAPER[1] - TAPER[0])).clamp(0.0, 1.0)
        taper = 0.5 * (1 + torch.cos(math.pi * x))
        pair = self.depth * ((1 - torch.exp(-self.alpha * (r - self.r0))) ** 2 - 1)
        return 0.5 * (pair * taper).sum()


class StifferMorse(MorsePotential):
    def __init__(self):
        super().__init__(depth=0.45, alpha=1.55, r0=2.6)
