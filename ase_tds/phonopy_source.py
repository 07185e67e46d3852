"""PhonopyForceConstants: phonopy force constants used as they are, as a force-constant source for TDSModel.

A ForceConstantModel projects force constants onto a symmetry basis inside a cutoff; this class does
not: D(q) is phonopy's own dynamical matrix (the convention of docs/theory.md, phases from atomic positions), every
supercell pair kept, a pair with several equidistant shortest images shared equally between them
(phonopy's multiplicities), then made Hermitian as phonopy does. It offers what TDSModel, the
covariance and plot_dispersion read from a force-constant source — `primitive`, `unitcell`, `masses`,
`n_atoms`, `dynamical_matrix(q)`, `frequencies(q)`, `q_from_hkl` — with nothing trainable.
"""

from __future__ import annotations

import numpy as np
import torch

from .dynamical import assemble_dynamical_matrix, group_by_block, row_sum_bound
from .model import ForceConstantModel
from .phonopy_load import load_phonopy, short_range_force_constants
from .structure import reciprocal_q
from .source import SourceTensors
from .structure import to_ase_atoms


class PhonopyForceConstants(SourceTensors, torch.nn.Module):
    """Phonopy force constants (full (N, N, 3, 3) or compact (n_p, N, 3, 3), eV/Å²) as they are.

    PhonopyForceConstants(source): a phonopy.Phonopy with force constants, a phonopy.load-able file,
    or a folder holding phonopy_params.yaml. `primitive` and `unitcell` are phonopy's, as ase.Atoms;
    masses (n,) amu are phonopy's primitive masses. Move with .to(device).

    Args:
        source (phonopy.Phonopy | str | Path): phonopy.Phonopy with force constants, a phonopy.load-able file, or a
            folder holding phonopy_params.yaml.
        dtype: torch dtype of D(q) (its complex counterpart) and of the buffers.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable file, or one without force constants (see `load_phonopy`).
    """

    def __init__(self, source, dtype: torch.dtype = torch.float64):
        super().__init__()
        ph = load_phonopy(source)
        prim = ph.primitive
        self.unitcell = to_ase_atoms(ph.unitcell)
        self.primitive = to_ase_atoms(prim)
        fc = short_range_force_constants(ph, self.primitive)
        if ph.nac_params is not None:
            from .dipole import BornCharges

            self.born = BornCharges.from_phonopy_born(ph, self.primitive)
        n, n_super = len(prim), len(ph.supercell)
        rows = np.arange(n) if fc.shape[0] == n else prim.p2s_map  # compact or full layout
        s2pp = np.array([prim.p2p_map[s] for s in prim.s2p_map])  # (N,) the primitive atom of each supercell atom
        svecs, multi = prim.get_smallest_vectors()  # (V, 3) reduced, (N, n, 2): count and address
        masses = np.asarray(prim.masses, dtype=float)

        # one term per (primitive atom κ, supercell atom k, shortest image): Φ(κ, k) / (multiplicity √(m_κ m_κ'))
        kappa, k = np.meshgrid(np.arange(n), np.arange(n_super), indexing="ij")
        count, address = multi[k, kappa, 0], multi[k, kappa, 1]
        term_kappa, term_k = np.repeat(kappa.ravel(), count.ravel()), np.repeat(k.ravel(), count.ravel())
        starts = np.repeat(address.ravel(), count.ravel())
        offsets = np.arange(len(starts)) - np.repeat(np.cumsum(count.ravel()) - count.ravel(), count.ravel())
        vectors = svecs[starts + offsets] @ np.array(prim.cell)  # Cartesian r_k' − r_κ, Å
        kappa2 = s2pp[term_k]
        weight = fc[rows[term_kappa], term_k] / (np.repeat(count.ravel(), count.ravel())
                                                 * np.sqrt(masses[term_kappa] * masses[kappa2]))[:, None, None]
        keep = np.abs(weight).max(axis=(1, 2)) > 0
        slots, filled = group_by_block(term_kappa[keep] * n + kappa2[keep], n)  # (n², m), padded
        self.n_terms = int(keep.sum())
        self.register_buffer("theta", torch.zeros(0, dtype=dtype))  # no parameters (ForceConstantSource.theta)
        self.register_buffer("masses", torch.tensor(masses, dtype=dtype))
        self.register_buffer("block_vectors", torch.tensor(vectors[keep][slots] * filled[..., None], dtype=dtype))
        self.register_buffer("block_weighted", torch.tensor(weight[keep][slots] * filled[..., None, None], dtype=dtype))

    @property
    def n_atoms(self) -> int:
        """Atoms in the primitive cell."""
        return len(self.primitive)

    def __repr__(self) -> str:
        return f"PhonopyForceConstants({self.primitive.get_chemical_formula()}, {self.n_terms} image terms)"

    def dynamical_matrix(self, q, q_direction=None) -> torch.Tensor:
        """D(q) (B, 3n, 3n) complex, eV/Å²/amu, for Cartesian q (B, 3) Å⁻¹: phonopy's, made Hermitian; with phonopy's
        Born charges (`nac_params`) its Gonze–Lee dipole–dipole term too, at any q (`ase_tds.dipole`).

        Args:
            q (array_like | torch.Tensor): Cartesian q (B, 3) Å⁻¹ (array or tensor; reshaped to (B, 3)).
            q_direction (array_like | torch.Tensor | None): (B, 3) or (3,), the direction of approach at Γ points
                (the non-analytic term); None: left out there.

        Returns:
            D(q) (B, 3n, 3n) complex eV/Å²/amu, n = `n_atoms`.
        """
        q = torch.as_tensor(q, dtype=self.dtype, device=self.device).reshape(-1, 3)
        angle = torch.einsum("ba,kma->bkm", q, self.block_vectors)
        dyn = assemble_dynamical_matrix(angle, self.block_weighted, self.n_atoms)
        if self.born is not None:
            dyn = dyn + self.dipole_matrix(q, q_direction)
        return 0.5 * (dyn + dyn.mH)

    def eigenvalue_bound(self) -> float:
        """An upper bound (eV/Å²/amu) on the eigenvalues of D(q) at every q.

        Returns:
            The bound, eV/Å²/amu.
        """
        return row_sum_bound(self.block_weighted, self.n_atoms) + self.dipole_bound()

    # ν(q) from D(q): the same few lines as the model's (eigvalsh, signed √, THz)
    frequencies = ForceConstantModel.frequencies

    def q_from_hkl(self, hkl, cell=None) -> np.ndarray:
        """Cartesian q (N, 3) in Å⁻¹ from hkl in r.l.u. of `cell` (default phonopy's unit cell).

        Args:
            hkl (array_like): (N, 3) r.l.u. of `cell`.
            cell (array_like | None): lattice vectors (3, 3) Å as rows; None = phonopy's unit cell.

        Returns:
            q (N, 3) Å⁻¹, Cartesian.
        """
        return reciprocal_q(hkl, self.unitcell.cell[:] if cell is None else cell)
