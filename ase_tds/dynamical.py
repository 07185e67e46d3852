"""D(q) from pair force constants: the assembly kernels both force-constant sources and the samplers share.

Pairs (κ0; κ'l) are grouped by atom block κ·n + κ' (`group_by_block`), so that D(q) is two real batched matrix
products (`assemble_dynamical_matrix`); `row_sum_bound` bounds its spectrum at every q; `fold_pairs` sums pair blocks
into a supercell's force-constant array.
"""

from __future__ import annotations

import numpy as np
import torch


def group_by_block(block: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs grouped by atom block b = κ·n + κ' (P,): (slots (n², m) pair indices, filled (n², m) 0/1).

    m is the largest group; shorter groups are padded with pair 0 and filled = 0, so that a padded
    pair contributes nothing once its weight is multiplied by `filled`.

    Args:
        block: (P,) int block index κ·n + κ' of each pair.
        n: atoms in the primitive cell.

    Returns:
        slots (n², m) int pair indices and filled (n², m) float 0/1.
    """
    block = np.asarray(block)
    counts = np.bincount(block, minlength=n * n)
    order = np.argsort(block, kind="stable")
    rank = np.arange(len(block)) - np.repeat(np.cumsum(counts) - counts, counts)
    slots = np.zeros((n * n, max(int(counts.max()), 1)), dtype=np.int64)
    filled = np.zeros(slots.shape)
    slots[block[order], rank] = order
    filled[block[order], rank] = 1.0
    return slots, filled


def assemble_dynamical_matrix(angle: torch.Tensor, weighted: torch.Tensor, n: int) -> torch.Tensor:
    """D (B, 3n, 3n) complex: block κ,κ' = Σ_m e^{i·angle[b, k, m]} weighted[k, m], k = κ·n + κ'.

    angle (B, n², m) rad; weighted (n², m, 3, 3) Φ/√(m_κ m_κ') in eV/Å²/amu, zero for padding (see
    `group_by_block`). Two real batched matmuls, cos and sin: no scatter, no complex exponentials.

    Args:
        angle: q·r per pair (B, n², m) rad.
        weighted: Φ/√(m_κ m_κ') (n², m, 3, 3) eV/Å²/amu.
        n: atoms in the primitive cell.

    Returns:
        D (B, 3n, 3n) complex eV/Å²/amu.
    """
    w = weighted.reshape(n * n, -1, 9)
    real = torch.einsum("bkm,kme->bke", torch.cos(angle), w)
    imag = torch.einsum("bkm,kme->bke", torch.sin(angle), w)
    # one pass from the block layout (B, κ, κ', α, β) to (B, κα, κ'β)
    real, imag = (part.reshape(-1, n, n, 3, 3).permute(0, 1, 3, 2, 4) for part in (real, imag))
    return torch.complex(real, imag).reshape(-1, 3 * n, 3 * n)


def row_sum_bound(weighted: torch.Tensor, n: int) -> float:
    """max over rows and columns of Σ|w| for weighted (n², m, 3, 3) as in `assemble_dynamical_matrix`.

    Every |D_ij(q)| ≤ Σ_pairs |w_ij|, so this bounds ‖D(q)‖∞ and ‖D(q)‖₁, hence every eigenvalue of
    D(q) (and of (D + D†)/2), at every q.

    Args:
        weighted: Φ/√(m_κ m_κ') (n², m, 3, 3) eV/Å²/amu.
        n: atoms in the primitive cell.

    Returns:
        The bound, eV/Å²/amu.
    """
    with torch.no_grad():
        entries = weighted.abs().reshape(n, n, -1, 3, 3).sum(2)  # (κ, κ', α, β)
        rows, cols = entries.sum(dim=(1, 3)), entries.sum(dim=(0, 2))
        return float(torch.maximum(rows.max(), cols.max()))


def fold_pairs(pair_fc: torch.Tensor, entries, n_rows: int, n_super: int) -> torch.Tensor:
    """Sum per-pair blocks (P, ...) into (n_rows, n_super, ...) at `entries` (M, 3): (row, pair, column).

    Args:
        pair_fc: per-pair blocks (P, ...), e.g. Φ (P, 3, 3) eV/Å².
        entries (array_like): (M, 3) int (row, pair, column), as `ForceConstantModel.supercell_columns` gives.
        n_rows: rows of the result.
        n_super: atoms N of the supercell.

    Returns:
        (n_rows, n_super, ...) in the units of `pair_fc`, differentiable in it.
    """
    entries = torch.as_tensor(entries, device=pair_fc.device)
    flat = torch.zeros(n_rows * n_super, *pair_fc.shape[1:], dtype=pair_fc.dtype, device=pair_fc.device)
    flat.index_add_(0, entries[:, 0] * n_super + entries[:, 2], pair_fc[entries[:, 1]])
    return flat.reshape(n_rows, n_super, *pair_fc.shape[1:])
