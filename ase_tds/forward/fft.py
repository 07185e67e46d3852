"""The all-order model for points on a regular hkl grid, by FFTs over one periodic crystal (docs/theory.md, "FFT route
for volumes").

Every voxel of a volume lies on the reciprocal lattice of one periodic crystal of L1×L2×L3 primitive cells
(`voxels.commensurate_grid`): Q = G + q with q on the crystal's q mesh, and e^{iG·R_l} = 1. The crystal's exact
intensity (the per-point gaussian model with refine=False on that grid) is then, per pair of atoms (κ, κ'),

    Σ_l e^{−iQ·(r_κ'l − r_κ0)} [e^{X_l} − 1],  X_l = Q·C_{κ0,κ'l}·Q,
    = e^{−iQ·(r_κ' − r_κ)} Σ_{n=1}^{N} Σ_{|α|=2n} Q^α · FFT_l[c_α^{(n)}(l)](q),

with c^{(n)}(l) the coefficients of X_l^n/n! as a polynomial of degree 2n in Q (symmetric tensor powers of C(l)).
Their FFTs over the crystal are computed once per θ; each voxel gathers the entry of its q and contracts it with
its monomials Q^α. The order n = 1 is the one-phonon term on the crystal's own q mesh (each q once); N is the
smallest order whose tail is below `tail` relative to every term (|X| ≤ max_κ 2W_κ).
"""

from __future__ import annotations

import contextlib
from math import ceil, exp, factorial
from typing import ClassVar

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..scattering import DebyeWaller
from ..structure import on_bragg_peaks
from .base import ForwardModel
from .gaussian import GaussianModel
from .grid import ACCURACY, Q_MAX, check_grid, larger
from .voxels import INDEX_CHUNK, commensurate_grid, lattice_index, mesh_index

TAIL = 1e-4  # the truncated orders' largest share of any term e^X − 1 (the default of `tail`)
MAX_ORDERS = 16  # beyond this many orders (2W ≳ 3) the per-point model is the better route
TABLE_BYTES = 2**28  # bytes of one block of columns of the FFT table, the only part of it that lives at a time
BLOCK_ENTRIES = 2**22  # float64 entries of a voxel block's gathered table, and of a cell block's coefficients


def orders_for(x_max: float, tail: float) -> int:
    """The smallest N ≥ 1 with x^N/(N+1)! · e^{2x} ≤ tail for x = x_max: then |Σ_{n>N} X^n/n!| ≤ tail·|e^X − 1| for
    every |X| ≤ x_max (the tail is at most |X|^{N+1}/(N+1)!·e^{|X|}, and |e^X − 1| ≥ |X|e^{−|X|}).

    Args:
        x_max: the largest |X| = |Q·C·Q| of the data, max_κ 2W_κ(Q).
        tail: the relative bound, in (0, 1).

    Returns:
        N, the highest order kept.

    Raises:
        ValueError: more than MAX_ORDERS orders needed.
    """
    for order in range(1, MAX_ORDERS + 1):
        if x_max**order / factorial(order + 1) * exp(2 * x_max) <= tail:
            return order
    raise ValueError(f"the fft model needs more than {MAX_ORDERS} orders at 2W = {x_max:.3g} (|Q| up to q_max): use "
                     "the per-point 'gaussian' model, or a smaller q_max")


def exponents(degree: int) -> np.ndarray:
    """The exponents (a, b, c) of the monomials Q_x^a Q_y^b Q_z^c of one degree, (M, 3) int, M = (d+1)(d+2)/2."""
    return np.array([(a, b, degree - a - b) for a in range(degree, -1, -1) for b in range(degree - a, -1, -1)])


class Monomials:
    """The monomials Q^α of degrees 2, 4, …, 2N and the coefficients of X^n/n! in them, X = Q·C·Q.

    Columns: the monomials of degree 2 (order 1), then of degree 4 (order 2), …, M in all.

    Args:
        orders: N.
    """

    def __init__(self, orders: int):
        self.orders = int(orders)
        self.exponents = [exponents(2 * n) for n in range(1, self.orders + 1)]
        self.all_exponents = np.concatenate(self.exponents)
        quadratic = self.exponents[0]
        # order n from n − 1: column α of X^{n−1} times column β of X goes to column α + e_β of X^n
        self.targets = []
        for n in range(2, self.orders + 1):
            index = {tuple(e): k for k, e in enumerate(self.exponents[n - 1])}
            self.targets.append([torch.as_tensor([index[tuple(e + b)] for e in self.exponents[n - 2]])
                                 for b in quadratic])
        # X = Σ_ij Q_i C_ij Q_j: the entry (i, j), i ≤ j, of each quadratic monomial
        unit = np.eye(3, dtype=int)
        self.quadratic = [next((i, j) for i in range(3) for j in range(i, 3) if (unit[i] + unit[j] == e).all())
                          for e in quadratic]

    @property
    def columns(self) -> int:
        """M, the number of monomials."""
        return len(self.all_exponents)

    def values(self, q: torch.Tensor, columns: slice = slice(None)) -> torch.Tensor:
        """Q^α (B, M) for Cartesian q (B, 3) Å⁻¹ (those of `columns` alone: (B, len(columns)))."""
        powers = [torch.ones_like(q)]
        for _ in range(2 * self.orders):
            powers.append(powers[-1] * q)
        powers = torch.stack(powers, dim=-1)  # (B, 3, 2N + 1): Q_i^k
        e = torch.as_tensor(self.all_exponents[columns], device=q.device)
        return (powers[:, 0].index_select(1, e[:, 0]) * powers[:, 1].index_select(1, e[:, 1])
                * powers[:, 2].index_select(1, e[:, 2]))

    @property
    def widths(self) -> list[int]:
        """The number of monomials of each order, [M_1, …, M_N]."""
        return [len(e) for e in self.exponents]

    def powers(self, first: torch.Tensor) -> torch.Tensor:
        """X^n for n = 1…N, (M, ...): the orders' coefficients as consecutive blocks of rows (`widths`), from those
        of X (6, ...), order by order: X^n = X^{n−1}·X."""
        out = first.new_zeros((self.columns, *first.shape[1:]))
        powers = out.split(self.widths)
        powers[0].copy_(first)
        for n, targets in enumerate(self.targets, start=2):
            for beta, target in enumerate(targets):
                powers[n - 1].index_add_(0, target.to(first.device), powers[n - 2] * first[beta])
        return out

    def coefficients(self, correlation: torch.Tensor) -> torch.Tensor:
        """The coefficients of X^n/n!, n = 1…N, (M, ...) Å^{2n}, for C (3, 3, ...) Å² (components first: every
        product is over contiguous rows).

        Args:
            correlation: C (3, 3, ...) Å².

        Returns:
            (M, ...): Σ_α coefficient_α Q^α = Σ_n (Q·C·Q)^n/n!.
        """
        first = torch.stack([correlation[i, j] + correlation[j, i] if i != j else correlation[i, i]
                             for i, j in self.quadratic])
        return _Powers.apply(first, self)


class _Powers(torch.autograd.Function):
    """The coefficients of X^n/n!, n = 1…N (M, ...), from those of X (6, ...), with a backward that recomputes the
    powers instead of keeping the products of every step: X^n[α + e_β] gathers X^{n−1}[α]·X[β], so
    ∂/∂X^{n−1}[α] += g_n[α + e_β]·X[β] and ∂/∂X[β] += Σ_α g_n[α + e_β]·X^{n−1}[α], from order N down."""

    @staticmethod
    def forward(ctx, first, monomials):
        ctx.save_for_backward(first)
        ctx.monomials = monomials
        out = monomials.powers(first)
        for n, power in enumerate(out.split(monomials.widths), start=1):
            power /= factorial(n)  # X^n/n!
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (first,) = ctx.saved_tensors
        cells = max(BLOCK_ENTRIES // ctx.monomials.columns, 1)
        flat = first.reshape(6, -1)  # each cell on its own: a block of cells at a time
        parts = [_Powers._gradient(f, g, ctx.monomials)
                 for f, g in zip(flat.split(cells, dim=1), grad.reshape(len(grad), -1).split(cells, dim=1))]
        return torch.cat(parts, dim=1).reshape(first.shape), None

    @staticmethod
    def _gradient(first, grad, monomials):
        """∂/∂X (6, c) for the output's gradient (M, c) of one block of c cells."""
        powers = monomials.powers(first).split(monomials.widths)
        grads = [g / factorial(n) for n, g in enumerate(grad.split(monomials.widths), start=1)]
        grad_first = torch.zeros_like(first)
        for n in range(monomials.orders, 1, -1):  # order n from n − 1
            for beta, target in enumerate(monomials.targets[n - 2]):
                picked = grads[n - 1].index_select(0, target.to(grad.device))  # g_n[α + e_β], (M_{n−1}, c)
                grads[n - 2] = grads[n - 2] + picked * first[beta]
                grad_first[beta] += (picked * powers[n - 2]).sum(0)
        return grad_first + grads[0]


class _Sums(torch.autograd.Function):
    """The FFT sums S (B, P, 2) of voxels q (B, 3), differentiable in the pairs' C_{κ0,κ'l} (3, 3, P, G): the forward
    is `compute()` (no graph: the table is built a block of columns at a time and dropped); the backward goes back
    block by block too (`FFTModel._pairs_gradient`), so that only one block of the table and of its gradient lives at
    a time. Inside `covariance_once` (`pending` a list) the backward only keeps (q, ∂/∂S) of its voxels: the blocks
    go back once for every chunk together, as the context closes."""

    @staticmethod
    def forward(ctx, pairs, q, compute, model, grid, orders, pending):
        ctx.save_for_backward(pairs, q)
        ctx.model, ctx.grid, ctx.orders, ctx.pending = model, grid, orders, pending
        return compute()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        pairs, q = ctx.saved_tensors
        if ctx.pending is not None:
            ctx.pending.append((ctx.grid, q, grad.contiguous()))
            return (None,) * 7
        return ctx.model._pairs_gradient(pairs, ctx.grid, ctx.orders, q, grad), None, None, None, None, None, None


class FFTModel(ForwardModel):
    """All-order I(Q) (B,) e.u./atom at Cartesian Q (B, 3) Å⁻¹ on the reciprocal lattice of one periodic crystal.

    The crystal (`grid`) is the smallest multiple of the voxels' own commensurate crystal (`commensurate_grid`) that
    is at least the per-point gaussian model's converged default there (its grid times the near-Bragg factor
    GRID_FACTORS that its nearest voxel to a Bragg peak needs). Its Debye–Waller factor is its own self covariance.

    Args:
        force_constants (ForceConstantSource): as `ForwardModel`.
        temperature (float): K, as `ForwardModel`.
        statistics (str): as `ForwardModel`.
        form_factors (str | Mapping): as `ForwardModel`.
        chunk (int | None): voxels per block of the contraction (None: by the table's width).
        grid (tuple[int, int, int] | None): (L1, L2, L3) primitive cells of the crystal; None: chosen for `voxels`.
        voxels (array_like | None): Cartesian Q (N, 3) Å⁻¹ of the points the model is for (a volume's voxels).
        voxel_grid (tuple[int, int, int] | None): the voxels' smallest commensurate crystal (None: from `voxels`,
            else `grid`); the error estimate's larger crystal is a multiple of it.
        tail: the truncated orders' largest share of any term e^X − 1, in (0, 1).
        accuracy: the per-point model's convergence criterion that chooses the grid (`converged_grid`).
        q_max: Å⁻¹, the largest |Q| evaluated (None: the voxels' largest, else Q_MAX); it sets the number of orders.

    Raises:
        ValueError: voxels that do not lie on a regular grid, neither voxels nor grid, voxels beyond q_max, a bad
            grid or tail (and as `ForwardModel`).
        UnstableError: choosing the grid met force constants that are not dynamically stable.
    """

    name = "fft"
    has_grid = True
    refine: ClassVar[bool] = False  # one crystal for every point (`model_error.choose_crystals` moves none)

    def __init__(self, force_constants, temperature: float, statistics: str = "quantum", form_factors="xraydb",
                 chunk: int | None = None, grid=None, voxels=None, voxel_grid=None, tail: float = TAIL,
                 accuracy: float = ACCURACY, q_max: float | None = None):
        super().__init__(force_constants, temperature, statistics, form_factors, chunk)
        if not (np.isfinite(tail) and 0 < tail < 1):
            raise ValueError(f"tail must be a relative error in (0, 1), e.g. 1e-4; got {tail!r}")
        if grid is None and voxels is None:
            raise ValueError("the fft model needs the points it is for (voxels=Cartesian Q) or its crystal (grid=...)")
        cell = force_constants.primitive.cell[:]
        voxels = None if voxels is None else np.asarray(torch.as_tensor(voxels).cpu(), dtype=float).reshape(-1, 3)
        largest = 0.0 if voxels is None or not len(voxels) else float(np.linalg.norm(voxels, axis=1).max())
        self.q_max = float(q_max) if q_max is not None else (largest if voxels is not None else Q_MAX)
        if largest > self.q_max * (1 + 1e-9):
            raise ValueError(f"the voxels reach |Q| = {largest:.4g} Å⁻¹, beyond q_max = {self.q_max:.4g} Å⁻¹")
        self.tail, self.accuracy = float(tail), float(accuracy)
        if voxel_grid is None and voxels is not None:
            voxel_grid = commensurate_grid(voxels, cell)
            if voxel_grid is None:
                raise ValueError("the points do not lie on a regular hkl grid (no periodic crystal of at most "
                                 "256 cells per axis has them all on its reciprocal lattice): use the per-point "
                                 "'gaussian' model")
        self.voxel_grid = check_grid(voxel_grid if voxel_grid is not None else grid)
        self.converged_grid = None  # the per-point model's converged default, where this model chose its grid
        self.grid = check_grid(grid) if grid is not None else self._commensurate_default(voxels)
        if any(g % v for g, v in zip(self.grid, self.voxel_grid)):
            raise ValueError(f"grid {self.grid} is not a multiple of the voxels' crystal {self.voxel_grid}")
        n = force_constants.n_atoms
        self._first, self._second = (torch.as_tensor(x) for x in np.triu_indices(n))  # pairs κ ≤ κ'
        self._monomials = {}
        # the voxels the model is for: their sums come from one pass of the table's blocks over all of them, at each θ
        self._voxels = None if voxels is None else self.as_q(voxels)
        self._registry = None  # (sorted keys, their voxels' positions, lowest n, extents) on `grid`, built once
        self._voxel_sums = (None, None)  # (θ, S (V, P, 2) of every voxel) at the last θ
        self._pending = None  # inside covariance_once: [(q, ∂/∂S)] of every chunk, for one backward of the blocks

    def _commensurate_default(self, voxels: np.ndarray) -> tuple[int, int, int]:
        """The smallest multiple of `voxel_grid` at least the per-point model's converged grid × the near-Bragg
        factor of the voxel nearest to a Bragg peak (voxels on a peak aside: no diffuse intensity is defined there)."""
        per_point = GaussianModel(self.force_constants, self.temperature, self.statistics, self.form_factors.source,
                                  accuracy=self.accuracy, q_max=self.q_max)
        self.converged_grid = per_point.grid
        away = voxels[~on_bragg_peaks(voxels, self.force_constants.primitive.cell[:])]
        level = int(per_point.levels(self.as_q(away)).max()) if len(away) else 0
        target = per_point.level_grid(level)
        return tuple(v * ceil(t / v) for v, t in zip(self.voxel_grid, target))

    def monomials(self, orders: int) -> Monomials:
        """The monomials of orders 1…`orders` (built once)."""
        if orders not in self._monomials:
            self._monomials[orders] = Monomials(orders)
        return self._monomials[orders]

    def orders(self, self_covariance: torch.Tensor) -> int:
        """N for this crystal: `orders_for` at x = q_max² · the largest eigenvalue of C_{κ0,κ0} (≥ max 2W_κ(Q))."""
        largest = torch.linalg.eigvalsh(self_covariance.detach()).max().item()
        return orders_for(self.q_max**2 * max(largest, 0.0), self.tail)

    # ------------------------------------------------------------------ the crystal's tables
    def _pair_correlation(self, grid) -> tuple[torch.Tensor, torch.Tensor]:
        """(C_{κ0,κ'l} of the pairs κ ≤ κ', (3, 3, P, G) Å², and C_{κ0,κ0} (n, 3, 3) Å²) of the crystal `grid`."""
        crystal = self.covariance.real_space(grid, recompute=True)
        pairs = crystal.correlation[:, self._first, self._second].permute(2, 3, 1, 0).contiguous()
        return pairs, crystal.self_covariance()

    def _table_bytes(self, grid, monomials: Monomials) -> int:
        """Bytes of the crystal's half-spectrum table (as many as its real coefficients)."""
        return int(np.prod(grid)) * len(self._first) * monomials.columns * 8

    def _spectrum(self, coefficients: torch.Tensor, grid) -> torch.Tensor:
        """The half-spectrum T (M, P, K, 2) over l of coefficients (M, P, G), K = L1·L2·(L3//2 + 1), as (real,
        imaginary): a view of the FFT's output."""
        columns, pairs = coefficients.shape[:2]
        spectrum = torch.fft.rfftn(coefficients.reshape(columns, pairs, *grid), dim=(-3, -2, -1))
        return torch.view_as_real(spectrum).reshape(columns, pairs, -1, 2)

    def tables(self, grid) -> tuple[torch.Tensor, torch.Tensor]:
        """(C_{κ0,κ0} (n, 3, 3) Å², the pairs' C_{κ0,κ'l} (3, 3, P, G) Å²) of the crystal `grid`, in θ's graph where a
        gradient is wanted (cached at fixed θ otherwise): the FFT table is built from them a block of columns at a
        time (`_blocks`), never whole.

        Raises:
            UnstableError: D(q) is not positive definite at some q of the crystal's mesh.
        """
        def compute():
            pairs, self_covariance = self._pair_correlation(grid)
            return self_covariance, pairs

        return self._at_fixed_theta(f"fft{tuple(grid)}", compute)

    def _blocks(self, orders: int, grid) -> list[tuple[int, int]]:
        """The table's blocks of columns [start, stop), each of at most TABLE_BYTES of half-spectrum."""
        entries = len(self._first) * grid[0] * grid[1] * (grid[2] // 2 + 1) * 2 * 8  # bytes of one column
        columns = self.monomials(orders).columns
        width = max(TABLE_BYTES // entries, 1)
        return [(start, min(start + width, columns)) for start in range(0, columns, width)]

    def _block_spectrum(self, pairs: torch.Tensor, grid, orders: int, start: int, stop: int) -> torch.Tensor:
        """The half-spectrum (stop − start, P, K, 2) of the columns [start, stop) of the coefficients, from the pairs'
        C_{κ0,κ'l} (3, 3, P, G): the powers up to the block's highest order only, a block of cells at a time."""
        needed = next(n for n in range(1, orders + 1) if self.monomials(n).columns >= stop)
        monomials = self.monomials(needed)  # its columns are the first of `orders`' (by order)
        cells = max(BLOCK_ENTRIES // (len(self._first) * monomials.columns), 1)
        coefficients = torch.cat([monomials.coefficients(part)[start:stop] for part in pairs.split(cells, dim=-1)],
                                 dim=-1)
        return self._spectrum(coefficients, grid)

    def _index(self, q: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        """(k (B,) the half-spectrum entry of each voxel's q, sign (B,) −1 where it holds −q (the conjugate))."""
        index = torch.empty(len(q), dtype=torch.long, device=q.device)
        sign = torch.empty(len(q), dtype=q.dtype, device=q.device)
        extent = torch.as_tensor(grid, device=q.device)
        for start in range(0, len(q), INDEX_CHUNK):  # a chunk at a time: the temporaries do not scale with the volume
            part = slice(start, start + INDEX_CHUNK)
            m = mesh_index(q[part], self.force_constants.primitive.cell[:], grid)
            conjugate = m[:, 2] > grid[2] // 2
            m = torch.where(conjugate[:, None], torch.remainder(-m, extent), m)
            index[part] = (m[:, 0] * grid[1] + m[:, 1]) * (grid[2] // 2 + 1) + m[:, 2]
            sign[part] = 1.0 - 2.0 * conjugate.to(q.dtype)
        return index, sign

    def _chunk_for(self, columns: int) -> int:
        return self._chunk or max(BLOCK_ENTRIES // (2 * len(self._first) * columns), 1)

    @torch.no_grad()
    def _sums_by_blocks(self, pairs: torch.Tensor, grid, orders: int, q: torch.Tensor) -> torch.Tensor:
        """S (B, P, 2): Σ_α Q^α T[α, p, k_v] as (real, imaginary) of voxels q (B, 3), each block of the table's
        columns built once and applied to every voxel (a chunk of voxels at a time) before the next."""
        index, sign = self._index(q, grid)
        monomials = self.monomials(orders)
        sums = q.new_zeros((len(q), len(self._first), 2))
        for start, stop in self._blocks(orders, grid):
            # entries first (K, c, P, 2): each voxel gathers one contiguous row
            table = self._block_spectrum(pairs, grid, orders, start, stop).permute(2, 0, 1, 3).contiguous()
            chunk = self._chunk_for(stop - start)
            for first in range(0, len(q), chunk):
                part = slice(first, first + chunk)
                values = monomials.values(q[part], slice(start, stop))  # (b, c)
                sums[part] += torch.einsum("bapc,ba->bpc", table.index_select(0, index[part]), values)
            del table
        sums[..., 1] *= sign[:, None]  # the conjugate half-spectrum
        return sums

    def _pairs_gradient(self, pairs: torch.Tensor, grid, orders: int, q: torch.Tensor,
                        grad: torch.Tensor) -> torch.Tensor:
        """∂/∂C_{κ0,κ'l} (3, 3, P, G) of Σ_v ∂L/∂S_v · S_v for voxels q (B, 3) and ∂L/∂S (B, P, 2), a block of
        columns at a time: the voxels' weights ∂L/∂S_v Q_v^α scattered onto the block's half-spectrum entries, then
        back through that block's FFT and powers (recomputed) by autograd."""
        index, sign = self._index(q, grid)
        grad = torch.stack([grad[..., 0], grad[..., 1] * sign[:, None]], dim=-1)
        monomials = self.monomials(orders)
        out = torch.zeros_like(pairs)
        for start, stop in self._blocks(orders, grid):
            chunk = self._chunk_for(stop - start)
            weights = None
            for first in range(0, len(q), chunk):
                part = slice(first, first + chunk)
                values = monomials.values(q[part], slice(start, stop))
                scattered = torch.einsum("bpc,ba->bapc", grad[part], values)
                if weights is None:  # entries first (K, c, P, 2): each voxel adds into one contiguous row
                    k = grid[0] * grid[1] * (grid[2] // 2 + 1)
                    weights = scattered.new_zeros((k, stop - start, len(self._first), 2))
                weights.index_add_(0, index[part], scattered)
            if weights is None:
                continue
            weights = torch.view_as_complex(weights.permute(1, 2, 0, 3).contiguous())  # (c, P, K)
            adjoint = self._adjoint_spectrum(weights, grid)  # ∂/∂ the block's coefficients (c, P, G)
            del weights
            needed = next(n for n in range(1, orders + 1) if self.monomials(n).columns >= stop)
            cells = max(BLOCK_ENTRIES // (len(self._first) * self.monomials(needed).columns), 1)
            for part in range(0, pairs.shape[-1], cells):
                with torch.enable_grad():  # back through the powers, a block of cells at a time
                    leaf = pairs[..., part:part + cells].detach().requires_grad_(True)
                    coefficients = self.monomials(needed).coefficients(leaf)[start:stop]
                    out[..., part:part + cells] += torch.autograd.grad(coefficients, leaf,
                                                                       adjoint[..., part:part + cells])[0]
            del adjoint
        return out

    @staticmethod
    def _adjoint_spectrum(weights: torch.Tensor, grid) -> torch.Tensor:
        """The adjoint of `_spectrum`: ∂/∂x (c, P, G) of Σ_k Re(conj(W_k) T_k) for the half-spectrum T = rfftn(x) and
        weights W (c, P, K) complex: Re Σ_{k in the half} W_k e^{+2πi k·l/L} = (G/2)·irfftn(W·s), s = 2 on the
        planes k3 = 0 and k3 = L3/2 (those irfftn does not double) and 1 elsewhere. One inverse real FFT, no
        full complex spectrum (as autograd's backward of rfftn would build)."""
        planes = weights.reshape(*weights.shape[:2], grid[0], grid[1], grid[2] // 2 + 1)
        planes[..., 0] *= 2
        if grid[2] % 2 == 0:
            planes[..., -1] *= 2
        out = torch.fft.irfftn(planes, s=tuple(grid), dim=(-3, -2, -1))
        out *= int(np.prod(grid)) / 2
        return out.reshape(*weights.shape[:2], -1)

    def _voxel_positions(self, q: torch.Tensor, grid) -> torch.Tensor | None:
        """The positions of q (B, 3) among the model's voxels, or None where some are not among them (or `grid` is
        not the model's own crystal)."""
        if self._voxels is None or tuple(grid) != tuple(self.grid):
            return None
        cell = self.force_constants.primitive.cell[:]
        if self._registry is None:
            n = lattice_index(self._voxels, cell, grid)
            low = n.min(0).values
            extents = n.max(0).values - low + 1
            keys = self._keys(n - low, extents)
            order = torch.argsort(keys)
            self._registry = (keys[order], order, low, extents)
        keys, order, low, extents = self._registry
        try:
            n = lattice_index(q, cell, grid) - low
        except ValueError:
            return None
        if ((n < 0) | (n >= extents)).any():
            return None
        wanted = self._keys(n, extents)
        at = torch.searchsorted(keys, wanted).clamp(max=len(keys) - 1)
        if not torch.equal(keys[at], wanted):
            return None
        return order[at]

    @staticmethod
    def _keys(n: torch.Tensor, extents: torch.Tensor) -> torch.Tensor:
        return (n[:, 0] * extents[1] + n[:, 1]) * extents[2] + n[:, 2]

    def _computed_sums(self, q: torch.Tensor, grid, pairs: torch.Tensor, orders: int) -> torch.Tensor:
        """S (B, P, 2) of q without a graph: those of the model's own voxels, all computed together once per θ, else
        q's own by blocks."""
        positions = self._voxel_positions(q, grid)
        if positions is None:
            return self._sums_by_blocks(pairs.detach(), grid, orders, q)
        theta = self.force_constants.theta
        key, sums = self._voxel_sums
        if key is None or key.device != theta.device or not torch.equal(key, theta):
            self._voxel_sums = (None, None)  # the old sums are freed first
            sums = self._sums_by_blocks(pairs.detach(), grid, orders, self._voxels)
            self._voxel_sums = (theta.detach().clone(), sums)
        return sums[positions]

    def _sums(self, q: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        """(S (B, P, 2), C_{κ0,κ0} (n, 3, 3) Å²): the FFT sums of each voxel, differentiable in θ where a gradient is
        wanted (`_Sums`)."""
        self_covariance, pairs = self.tables(grid)
        orders = self.orders(self_covariance)
        flat = pairs.reshape(*pairs.shape[:3], -1)

        def compute():
            return self._computed_sums(q, grid, flat, orders)

        if torch.is_grad_enabled() and flat.requires_grad:
            return _Sums.apply(flat, q, compute, self, tuple(grid), orders, self._pending), self_covariance
        return compute(), self_covariance

    @contextlib.contextmanager
    def covariance_once(self):
        """As `ForwardModel.covariance_once`; the chunks' ∂/∂S are kept (small: (B, P, 2)) and go back through the
        table's blocks once, onto the pairs' C_{κ0,κ'l} leaf, as the context closes."""
        with super().covariance_once():
            self._pending = []
            try:
                yield
                pending, self._pending = self._pending, None
                for grid in dict.fromkeys(g for g, _, _ in pending):
                    q = torch.cat([p for g, p, _ in pending if g == grid])
                    grad = torch.cat([d for g, _, d in pending if g == grid])
                    self_covariance, pairs = self._shared[f"fft{grid}"][1]
                    gradient = self._pairs_gradient(pairs.detach().reshape(*pairs.shape[:3], -1), grid,
                                                    self.orders(self_covariance), q, grad).reshape(pairs.shape)
                    pairs.grad = gradient if pairs.grad is None else pairs.grad + gradient
                del pending
            finally:
                self._pending = None

    # ------------------------------------------------------------------ the protocol
    def forward(self, q, levels=None) -> torch.Tensor:
        """I(Q) (B,) e.u./atom at Cartesian q (B, 3) Å⁻¹ on the crystal's reciprocal lattice.

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹ (reshaped to (-1, 3)).
            levels (array_like | torch.Tensor | None): ignored (one crystal for every point).

        Returns:
            I(Q), (B,) e.u. per atom.

        Raises:
            ValueError: a Q off the crystal's reciprocal lattice, or beyond q_max.
            UnstableError: the force constants are not dynamically stable.
        """
        return self._intensity(self.as_q(q), self.grid)

    def _intensity(self, q: torch.Tensor, grid) -> torch.Tensor:
        if not len(q):
            return q.new_zeros(0)
        largest = torch.linalg.norm(q, dim=1).max().item()
        if largest > self.q_max * (1 + 1e-9):
            raise ValueError(f"|Q| = {largest:.4g} Å⁻¹ is beyond the fft model's q_max = {self.q_max:.4g} Å⁻¹ (its "
                             "number of orders is chosen for q_max): build it with a larger q_max")
        sums, self_covariance = self._sums(q, grid)
        amplitude = self.amplitude(q, DebyeWaller(self_covariance))
        positions = torch.as_tensor(self.force_constants.primitive.positions, dtype=q.dtype, device=q.device)
        phase = q @ (positions[self._second] - positions[self._first]).T  # Q·(r_κ' − r_κ), (B, P)
        weight = torch.where(self._first == self._second, 1.0, 2.0).to(q.dtype).to(q.device)
        pair = amplitude[:, self._first] * amplitude[:, self._second] * weight
        terms = torch.cos(phase) * sums[..., 0] + torch.sin(phase) * sums[..., 1]  # Re e^{−iφ}(S_re + i S_im)
        return (pair * terms).sum(-1) / self.force_constants.n_atoms

    @torch.no_grad()
    def discretisation_error(self, q, levels=None, signed: bool = False) -> torch.Tensor:
        """Estimated error (B,) e.u./atom of I(Q) from the finite crystal: I − I' with I' from the smallest multiple
        of `voxel_grid` at least 1.5 × `grid`.

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹ (reshaped to (-1, 3)).
            levels (array_like | torch.Tensor | None): ignored (one crystal).
            signed: give I − I' itself (its sign says which way the model errs).

        Returns:
            |I − I'| (or I − I'), (B,) e.u. per atom.
        """
        q = self.as_q(q)
        difference = self(q) - self.with_grid(self.larger_grid)(q)
        return difference if signed else torch.abs(difference)

    @property
    def larger_grid(self) -> tuple[int, int, int]:
        """The error estimate's crystal: the smallest multiple of `voxel_grid` at least 1.5 × `grid`."""
        return tuple(v * ceil(t / v) for v, t in zip(self.voxel_grid, larger(self.grid)))

    def for_points(self, q) -> FFTModel:
        """This model (its crystal, orders and q_max) for the points q (B, 3) Å⁻¹ alone: its sums at each θ are then
        computed for them, not for every voxel of the volume (a first fit's subset would otherwise pay for all)."""
        return self.rebuilt(voxels=q)

    def with_grid(self, grid) -> FFTModel:
        """This model on another crystal (a multiple of `voxel_grid`)."""
        return self.rebuilt(grid=grid)

    def options(self) -> dict:
        return {**super().options(), "grid": self.grid, "voxel_grid": self.voxel_grid, "tail": self.tail,
                "accuracy": self.accuracy, "q_max": self.q_max}

    def settings(self) -> dict:
        route = (f"fft: every point on the reciprocal lattice of the {'×'.join(map(str, self.grid))} crystal "
                 f"(a multiple of the points' own {'×'.join(map(str, self.voxel_grid))})")
        return {**super().settings(), "route": route, "grid": list(self.grid), "voxel_grid": list(self.voxel_grid),
                "converged_grid": None if self.converged_grid is None else list(self.converged_grid),
                "tail": self.tail, "accuracy": self.accuracy, "q_max": self.q_max}

    @classmethod
    def settings_options(cls, force_constants, settings: dict) -> dict:
        return {key: settings[key] for key in ("grid", "voxel_grid", "tail", "accuracy", "q_max")
                if settings.get(key) is not None}
