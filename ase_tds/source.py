"""What the forward models need of harmonic force constants: the `ForceConstantSource` protocol.

`ThermalCovariance`, `TDSModel`, `simulate` and `plot_dispersion` take any object with these members. Two
implement it: `ForceConstantModel` (symmetry-reduced, θ trainable) and `PhonopyForceConstants` (phonopy's force
constants used as they are, nothing trainable).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from ase import Atoms


class SourceTensors:
    """`dtype` and `device` of a force-constant source (a torch Module with a `masses` buffer), by name."""

    @property
    def dtype(self) -> torch.dtype:
        """The real dtype of every tensor the source returns (D(q): its complex counterpart)."""
        return self.masses.dtype

    @property
    def device(self) -> torch.device:
        """Where the source's tensors live (move with `.to(device)`)."""
        return self.masses.device


@runtime_checkable
class ForceConstantSource(Protocol):
    """Harmonic force constants of a crystal, as the forward models read them.

    Attributes:
        primitive: the primitive cell (ase.Atoms) that D(q) is written for; n = len(primitive).
        unitcell: the cell whose r.l.u. hkl are given in (ase.Atoms; e.g. the conventional cell).
        masses: (n,) amu, of the primitive cell's atoms.
        theta: (n_params,) eV/Å², the parameters D(q) is differentiable in; empty for fixed constants.
        dtype: the real dtype of every tensor the source returns (D(q) has its complex counterpart).
        device: where its tensors live.
    """

    primitive: Atoms
    unitcell: Atoms
    masses: torch.Tensor
    theta: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        """The real dtype of the source's tensors."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the source's tensors live."""
        ...

    @property
    def n_atoms(self) -> int:
        """n, atoms in the primitive cell."""
        ...

    def dynamical_matrix(self, q) -> torch.Tensor:
        """D(q) (B, 3n, 3n) complex, eV/Å²/amu, at Cartesian q (B, 3) Å⁻¹, phases from atomic positions.

        Args:
            q (array_like | torch.Tensor): Cartesian q (B, 3) Å⁻¹.

        Returns:
            D(q), (B, 3n, 3n) complex, eV/Å²/amu.
        """

    def eigenvalue_bound(self) -> float:
        """An upper bound (eV/Å²/amu) on the eigenvalues of D(q) at every q.

        Returns:
            The bound, eV/Å²/amu.
        """

    def frequencies(self, q) -> np.ndarray:
        """ν (B, 3n) THz at Cartesian q (B, 3) Å⁻¹, ascending; negative for imaginary modes.

        Args:
            q (array_like | torch.Tensor): Cartesian q (B, 3) Å⁻¹.

        Returns:
            ν, (B, 3n) THz.
        """

    def q_from_hkl(self, hkl, cell=None) -> np.ndarray:
        """Cartesian q (N, 3) Å⁻¹ from hkl (N, 3) in r.l.u. of `cell` (default: `unitcell`).

        Args:
            hkl (array_like): (N, 3) r.l.u. of `cell`.
            cell (array_like | None): (3, 3) Å, rows the lattice vectors; None: `unitcell`.

        Returns:
            Cartesian q, (N, 3) Å⁻¹.
        """
