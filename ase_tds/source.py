"""What the forward models need of harmonic force constants: the `ForceConstantSource` protocol.

`ThermalCovariance`, `TDSModel`, `simulate` and `plot_dispersion` take any object with these members. Two
implement it: `ForceConstantModel` (symmetry-reduced, θ trainable) and `PhonopyForceConstants` (phonopy's force
constants used as they are, nothing trainable).
"""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from ase import Atoms


# complex entries of unit-charge Gonze–Lee sums kept at fixed ε∞ (1 GiB in complex128): the q of a polar crystal's
# grid and both near-Bragg crystals at once (wurtzite ZnO: 24×24×13, 48×48×26 and 72×72×39, 3.9·10⁷ entries; at 2²³
# the two larger did not fit, and the Ewald sums were redone at every evaluation: half its time)
DIPOLE_CACHE_ENTRIES = 2**26
# the unit-charge sums of every source in the process, keyed by what they depend on: the models of one crystal (the
# range's candidates, a fit's refits) share them
_DIPOLE_KERNELS: collections.OrderedDict = collections.OrderedDict()
_DIPOLE_KERNELS_LOCK = threading.Lock()  # the covariance's chunks may look kernels up from several threads


def _dipole_key(q: torch.Tensor, q_direction, born, primitive) -> str:
    """A key of the values of q, the direction and what the unit-charge sums depend on (the primitive cell and its
    positions, ε∞, the Ewald parameters)."""
    digest = hashlib.sha1(q.detach().cpu().numpy().tobytes())
    for x in (q_direction, born.epsilon):
        if x is not None:
            digest.update(torch.as_tensor(x).detach().cpu().numpy().tobytes())
    digest.update(np.ascontiguousarray(primitive.cell[:], dtype=float).tobytes())
    digest.update(np.ascontiguousarray(primitive.positions, dtype=float).tobytes())
    digest.update(repr((born.factor, born.g_cutoff, born.ewald_lambda)).encode())
    return f"{q.device}:{q.dtype}:{tuple(q.shape)}:{digest.hexdigest()}"


def cached_dipole_kernel(q: torch.Tensor, primitive: Atoms, born, q_direction=None, reduce: bool = True):
    """`ase_tds.dipole.dipole_kernel` at fixed ε∞, kept in the process's cache (`_DIPOLE_KERNELS`): the same q (a
    grid's mesh, the data's points, a supercell's commensurate q) cost one Ewald sum, whatever Z*.

    Args:
        q: Cartesian q (B, 3) Å⁻¹, on the charges' dtype and device.
        primitive, born, q_direction, reduce: as `dipole_kernel` (born.epsilon not in a graph).
    """
    from .dipole import dipole_kernel

    key = f"{_dipole_key(q, q_direction, born, primitive)}:{reduce}"
    with _DIPOLE_KERNELS_LOCK:
        kernel = _DIPOLE_KERNELS.get(key)
        if kernel is not None:
            _DIPOLE_KERNELS.move_to_end(key)
    if kernel is None:
        kernel = dipole_kernel(q, primitive, born, q_direction, reduce)
        with _DIPOLE_KERNELS_LOCK:
            _DIPOLE_KERNELS[key] = kernel
            while sum(v.total.numel() for v in _DIPOLE_KERNELS.values()) > DIPOLE_CACHE_ENTRIES \
                    and len(_DIPOLE_KERNELS) > 1:
                _DIPOLE_KERNELS.popitem(last=False)
    return kernel


class SourceTensors:
    """What both force-constant sources share: `dtype` and `device` (from a `masses` buffer), and the dipole–dipole
    term of Born effective charges where the source has them (`born`, docs/theory.md "Polar crystals")."""

    born = None  # BornCharges of the primitive cell's atoms, or None: no dipole–dipole term

    @property
    def has_dipole(self) -> bool:
        """True where D(q) carries the dipole–dipole term of Born charges (non-analytic at Γ)."""
        return self.born is not None

    def born_charges(self):
        """The Born charges (`ase_tds.dipole.BornCharges`) on the source's dtype and device, or None."""
        return None if self.born is None else self.born.to(self.dtype, self.device)

    def dipole_matrix(self, q: torch.Tensor, q_direction=None) -> torch.Tensor:
        """D_dd(q) (B, 3n, 3n) complex eV/Å²/amu at Cartesian q (B, 3) Å⁻¹ (`ase_tds.dipole`); at Γ the non-analytic
        term along `q_direction` (B, 3) or (3,), left out where None.

        Raises:
            ValueError: a source without Born charges.
        """
        from .dipole import dipole_dynamical_matrix

        if self.born is None:
            raise ValueError("these force constants have no Born charges: no dipole–dipole term")
        born = self.born_charges()
        if born.epsilon.requires_grad:  # fitted ε∞: the sum over G in θ's graph, every time
            return dipole_dynamical_matrix(q, self.primitive, born, q_direction, self.masses)
        q = torch.as_tensor(q, dtype=self.dtype, device=self.device).reshape(-1, 3)
        kernel = cached_dipole_kernel(q, self.primitive, born, q_direction)
        return dipole_dynamical_matrix(q, self.primitive, born, q_direction, self.masses, kernel=kernel)

    def dipole_bound(self, mesh: int = 6) -> float:
        """A bound (eV/Å²/amu) on the largest eigenvalue of D_dd(q): 1.5 × the largest on a `mesh`³ grid and at Γ
        along the directions of `ase_tds.dipole.GAMMA_DIRECTIONS` (0 without Born charges).

        Returns:
            The bound, eV/Å²/amu.
        """
        from .covariance import mesh_q
        from .dipole import GAMMA_DIRECTIONS

        if self.born is None:
            return 0.0
        born = self.born_charges()
        key = torch.cat([born.charges.detach().reshape(-1), born.epsilon.detach().reshape(-1)]).cpu()
        cached = getattr(self, "_dipole_bound", None)
        if cached is not None and cached[0].shape == key.shape and torch.equal(cached[0], key):
            return cached[1]
        with torch.no_grad():
            q = mesh_q(self, (mesh,) * 3)
            directions = torch.as_tensor(GAMMA_DIRECTIONS[0], dtype=self.dtype, device=self.device)
            values = [torch.linalg.eigvalsh(self.dipole_matrix(q)).max(),
                      torch.linalg.eigvalsh(self.dipole_matrix(torch.zeros_like(directions), directions)).max()]
        self._dipole_bound = (key, 1.5 * max(float(v) for v in values))  # once per set of charges
        return self._dipole_bound[1]

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
