"""X-ray form factors, Debye–Waller exponents and the intensity kernels of docs/theory.md.

Intensities are kinematic, per atom of the crystal, in electron units (e.u.), diffuse part only.
Shapes: B scattering vectors, n atoms in the primitive cell, G lattice vectors of a real-space grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import threading

import numpy as np
import torch
import xraydb
from torch.autograd.function import once_differentiable

from .covariance import ThermalCovariance

# (a, b) of the partition of unity over the lattice: w = 1 within a·L, 0 beyond b·L (a + b = 1)
TRANSITION = (0.3, 0.7)


class FormFactors:
    """f_κ(|Q|) for the atoms of a cell: (B,) Å⁻¹ → (B, n) e.u.

    Args:
        symbols (Sequence[str]): the chemical symbols of the cell's n atoms, in order.
        source: "xraydb" (Waasmaier–Kirfel f₀ of the neutral atoms, argument sinθ/λ = |Q|/4π), or a
            mapping {symbol: constant or callable(|Q| ndarray Å⁻¹) → ndarray}, in e.u.; symbols missing from the
            mapping fall back to xraydb.

    Raises:
        ValueError: a source that is neither "xraydb" nor a mapping, or a mapping with symbols not in the cell.
    """

    def __init__(self, symbols, source: str | Mapping = "xraydb"):
        if not (source == "xraydb" or isinstance(source, Mapping)):
            raise ValueError("form factors: give 'xraydb' or a {symbol: constant or f(|Q|)} mapping")
        table = {} if source == "xraydb" else dict(source)
        unknown = sorted(set(table) - set(symbols))
        if unknown:
            raise ValueError(f"form factors given for {unknown}, which are not in the crystal ({sorted(set(symbols))})")
        self.symbols = list(symbols)
        self.source = source
        self._per_symbol: dict[str, Callable] = {}
        for symbol in set(symbols):
            value = table.get(symbol)
            if value is None:
                self._per_symbol[symbol] = lambda q, s=symbol: np.asarray(xraydb.f0(s, q / (4 * np.pi)), dtype=float)
            elif callable(value):
                self._per_symbol[symbol] = value
            else:
                self._per_symbol[symbol] = lambda q, c=float(value): np.full_like(q, c)

    def __call__(self, q_norm: torch.Tensor) -> torch.Tensor:
        """f_κ(|Q|) of every atom.

        Args:
            q_norm: |Q| (B,) Å⁻¹.

        Returns:
            f_κ(|Q|), (B, n) e.u., in the dtype and on the device of `q_norm` (no gradient).
        """
        q = q_norm.detach().cpu().numpy()
        values = {s: np.broadcast_to(f(q), q.shape) for s, f in self._per_symbol.items()}
        table = np.stack([values[s] for s in self.symbols], axis=-1)
        return torch.as_tensor(table, dtype=q_norm.dtype, device=q_norm.device)


def debye_waller_exponent(q: torch.Tensor, msd: torch.Tensor) -> torch.Tensor:
    """W_κ(Q) = ½ Q·C_{κ0,κ0}·Q, (B, n), for q (B, 3) Å⁻¹ and msd (n, 3, 3) Å².

    Args:
        q: Cartesian Q (B, 3) Å⁻¹.
        msd: C_{κ0,κ0} (n, 3, 3) Å², the self covariance of each atom.

    Returns:
        W_κ(Q), (B, n), dimensionless.
    """
    return 0.5 * torch.einsum("ba,kac,bc->bk", q, msd, q)


class DebyeWaller:
    """The Debye–Waller factor e^{−W_κ(Q)} of a crystal, from its self covariance C_{κ0,κ0} (n, 3, 3) Å² (a value).

    Args:
        self_covariance: C_{κ0,κ0}, (n, 3, 3) Å² (in θ's graph where a gradient is wanted).
    """

    def __init__(self, self_covariance: torch.Tensor):
        self.self_covariance = self_covariance

    def exponent(self, q: torch.Tensor) -> torch.Tensor:
        """W_κ(Q), (B, n), for Cartesian q (B, 3) Å⁻¹ (`debye_waller_exponent`)."""
        return debye_waller_exponent(q, self.self_covariance)

    def factor(self, q: torch.Tensor) -> torch.Tensor:
        """e^{−W_κ(Q)}, (B, n), for Cartesian q (B, 3) Å⁻¹."""
        return torch.exp(-self.exponent(q))


def one_phonon_intensity(covariance: ThermalCovariance, q: torch.Tensor, amplitude: torch.Tensor) -> torch.Tensor:
    """I₁(Q) = (1/n) Σ_κκ' A_κ A_κ' Q·C̃_κκ'(Q)·Q, (B,) e.u., with A_κ = f_κ e^{−W_κ} (B, n), for q (B, 3) Å⁻¹.

    C̃ at the unreduced Q, as the form v†(M^{1/2}C̃M^{1/2})v with v_κα = A_κ Q_α/√m_κ
    (`ThermalCovariance.mass_weighted_form`: one triangular solve per Q classically).

    Args:
        covariance: the thermal covariance C̃ of the crystal.
        q: Cartesian Q (B, 3) Å⁻¹.
        amplitude: A_κ = f_κ e^{−W_κ} (B, n), e.u.

    Returns:
        I₁(Q), (B,) e.u. per atom.

    Raises:
        UnstableError: D(Q) is not positive definite at some Q.
    """
    n = amplitude.shape[-1]
    inv_sqrt_m = 1.0 / torch.sqrt(covariance.source.masses)
    v = ((amplitude * inv_sqrt_m)[:, :, None] * q[:, None, :]).reshape(len(q), 3 * n)
    return covariance.mass_weighted_form(q, v) / n


def multi_phonon_intensity(q: torch.Tensor, amplitude: torch.Tensor, separations: torch.Tensor,
                           correlation: torch.Tensor) -> torch.Tensor:
    """Σ orders ≥ 2 with a sharp sum over the grid: (1/n) Σ_κκ' A_κ A_κ' Σ_l cos(Q·d) [e^X − 1 − X], (B,) e.u.

    X = Q·C_{κ0,κ'l}·Q. Exact for the periodic grid at Q on its reciprocal lattice; elsewhere `LatticeWindow`
    (a smooth partition of unity over the lattice) is the interpolation the models use.

    Args:
        q: Cartesian Q (B, 3) Å⁻¹.
        amplitude: A_κ = f_κ e^{−W_κ} (B, n), e.u.
        separations: d = r_κ'l − r_κ0, (G, n, n, 3) Å (`RealSpaceCovariance.separations`).
        correlation: C_{κ0,κ'l}, (G, n, n, 3, 3) Å² (`RealSpaceCovariance.correlation`).

    Returns:
        The orders ≥ 2 of I(Q), (B,) e.u. per atom.
    """
    n = amplitude.shape[-1]
    qq = (q[:, :, None] * q[:, None, :]).reshape(len(q), 9)
    x = qq @ correlation.reshape(-1, 9).T  # (B, G·n·n)
    phase = torch.cos(q @ separations.reshape(-1, 3).T)
    terms = (phase * (torch.expm1(x) - x)).reshape(len(q), -1, n, n).sum(1)
    return torch.einsum("bk,bkl,bl->b", amplitude, terms, amplitude) / n


def partition_of_unity(x: np.ndarray, transition=TRANSITION) -> np.ndarray:
    """w(x) (same shape) with Σ_m w(x + m) = 1 for every x, m over the integers: 1 for |x| ≤ a, 0 for
    |x| ≥ b, cos²(π/2·(|x| − a)/(b − a)) between, with (a, b) = `transition` (a + b = 1).

    Args:
        x: points (any shape), in periods.
        transition (tuple[float, float]): (a, b), a + b = 1; the default TRANSITION is (0.3, 0.7).

    Returns:
        w(x), float, the shape of `x`.
    """
    ax = np.abs(np.asarray(x, dtype=float))
    a, b = transition
    ramp = np.cos(0.5 * np.pi * np.clip((ax - a) / (b - a), 0.0, 1.0)) ** 2
    return np.where(ax <= a, 1.0, np.where(ax >= b, 0.0, ramp))


class LatticeWindow:
    """The lattice sum of the higher orders on a periodic grid of L1×L2×L3 primitive cells, for any Q.

    A periodic crystal's correlation C_{κ0,κ'l} is periodic in l; its exact diffuse intensity exists only
    on the grid's reciprocal lattice. For any other Q the sum runs over l in (−bL, bL) with the weight
    w(l1/L1)·w(l2/L2)·w(l3/L3) of `partition_of_unity`: at Q on that lattice it equals the sharp sum
    over one period exactly (the images of each l sum to one), elsewhere it interpolates smoothly
    instead of ringing as the sharp sum's Dirichlet kernel does. Terms (κ, κ', l) and (κ', κ, −l) are
    equal (same X, cos(Q·d) even) and are stored once with weight 2.

    Geometry only (no θ), for pairs p = κ·n + κ'.

    Args:
        primitive (ase.Atoms): the primitive cell (n atoms).
        grid (tuple[int, int, int]): (L1, L2, L3) primitive cells of the periodic crystal.
        dtype (torch.dtype): the real dtype of `separation` and `weight`.
        device (torch.device | str | None): where the tables live (None: torch's default device).
        transition (tuple[float, float]): (a, b) of `partition_of_unity`.

    Attributes:
        source: (n², m) indices into correlation.reshape(G·n², 9) of the `ThermalCovariance.real_space` grid
            (FFT order).
        separation: d = r_κ'l − r_κ0 of each term, (n², m, 3) Å.
        weight: w(l) of each term, times 2 where it stands for its (κ', κ, −l) partner too, (n², m) (0 = padding).
        grid: (L1, L2, L3).
        n_atoms: n.
    """

    def __init__(self, primitive, grid, dtype=torch.float64, device=None, transition=TRANSITION):
        grid = np.array([int(x) for x in grid])
        n = len(primitive)
        reach = np.floor(transition[1] * grid - 1e-9).astype(int)
        lattice = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
        weight = np.prod(partition_of_unity(lattice / grid, transition), axis=1)
        # one of each ±l: l = 0, or its first non-zero component positive (weight × 2)
        first = np.take_along_axis(lattice, np.argmax(lattice != 0, axis=1)[:, None], axis=1)[:, 0]
        keep = (weight > 0) & (first >= 0)
        lattice, weight = lattice[keep], weight[keep]
        origin = ~lattice.any(axis=1)
        folded = lattice % grid
        cell_index = (folded[:, 0] * grid[1] + folded[:, 1]) * grid[2] + folded[:, 2]
        positions = np.asarray(primitive.positions)
        vectors = lattice @ np.array(primitive.cell[:])
        rows = []
        for k in range(n):
            for k2 in range(n):
                # at l = 0 the pair (κ, κ') stands for (κ', κ) too: keep κ ≤ κ'
                use = ~origin | (k <= k2)
                mult = np.where(origin, 1.0 if k == k2 else 2.0, 2.0)[use]
                rows.append((cell_index[use] * n * n + k * n + k2, vectors[use] + positions[k2] - positions[k],
                             weight[use] * mult))
        m = max(len(r[0]) for r in rows)
        pad = lambda a, value: np.concatenate([a, np.full((m - len(a),) + a.shape[1:], value)])  # noqa: E731
        as_t = lambda a, dt: torch.as_tensor(np.stack(a), dtype=dt, device=device)  # noqa: E731
        self.grid = tuple(int(x) for x in grid)
        self.n_atoms = n
        self.source = as_t([pad(r[0], 0) for r in rows], torch.long)
        self.separation = as_t([pad(r[1], 0.0) for r in rows], dtype)
        self.weight = as_t([pad(r[2], 0.0) for r in rows], dtype)

    @property
    def n_terms(self) -> int:
        """Stored terms (padding included), n² · m."""
        return self.weight.numel()

    def gather(self, correlation: torch.Tensor) -> torch.Tensor:
        """C of each term, (n², m, 9) Å², from the grid's correlation (G, n, n, 3, 3).

        Args:
            correlation: C_{κ0,κ'l} (G, n, n, 3, 3) Å² of the `grid` crystal (`ThermalCovariance.real_space`).

        Returns:
            C of each term, (n², m, 9) Å².
        """
        return correlation.reshape(-1, 9)[self.source]

    def intensity(self, q: torch.Tensor, amplitude: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
        """Σ orders ≥ 2: (1/n) Σ_κκ' A_κ A_κ' Σ_l w(l) cos(Q·d) [e^X − 1 − X], (B,) e.u., X = Q·C_{κ0,κ'l}·Q.

        Memory O(B·n²·m): chunk q.

        Args:
            q: Cartesian Q (B, 3) Å⁻¹.
            amplitude: A_κ = f_κ e^{−W_κ} (B, n), e.u.
            terms: C of each term, (n², m, 9) Å², `gather(correlation)`.

        Returns:
            The orders ≥ 2 of I(Q), (B,) e.u. per atom.
        """
        return _HigherOrders.apply(q, amplitude, terms, self.separation, self.weight)


_local = threading.local()


def _buffers(shape, dtype, device) -> tuple[torch.Tensor, ...]:
    """Three arrays of `shape` for this thread, reused between calls: a fresh allocation of this size costs
    more in page faults than the arithmetic done in it."""
    key = (tuple(shape), dtype, device)
    if getattr(_local, "key", None) != key:
        _local.key, _local.arrays = key, tuple(torch.empty(shape, dtype=dtype, device=device) for _ in range(3))
    return _local.arrays


class _HigherOrders(torch.autograd.Function):
    """(1/n) Σ_p A_κ A_κ' S_p with S_p = Σ_j w cos(Q·d) (e^X − 1 − X), X = QQ:C (see LatticeWindow.intensity).

    Arrays (n², B, m), pair-major, so that every product is one batched matrix product over the pairs. The
    backward recomputes X and the phases instead of keeping them (memory O(B·n²) between passes):
    ∂I/∂C_pj = Σ_b g A_κ A_κ'/n · w cos(Q·d) (e^X − 1) QQ, ∂I/∂A from S.
    """

    @staticmethod
    def _parts(q, terms, separation):
        """(QQ (B, 9), X (n², B, m), cos(Q·d) (n², B, m)), the two large arrays in this thread's reused buffers."""
        qq = (q[:, :, None] * q[:, None, :]).reshape(len(q), 9)
        pairs = terms.shape[0]
        x, phase, _ = _buffers((pairs, len(q), terms.shape[1]), q.dtype, q.device)
        torch.bmm(qq.expand(pairs, -1, -1), terms.transpose(1, 2), out=x)
        torch.bmm(q.expand(pairs, -1, -1), separation.transpose(1, 2), out=phase)
        return qq, x, phase.cos_()

    @staticmethod
    def forward(ctx, q, amplitude, terms, separation, weight):
        _, x, phase = _HigherOrders._parts(q, terms, separation)
        higher = _buffers(x.shape, x.dtype, x.device)[2]
        torch.expm1(x, out=higher)
        sums = higher.sub_(x).mul_(phase.mul_(weight[:, None, :])).sum(-1).T  # Σ_j w cos (e^X − 1 − X), (B, n²)
        n = amplitude.shape[-1]
        pair = (amplitude[:, :, None] * amplitude[:, None, :]).reshape(len(q), n * n)
        ctx.save_for_backward(q, amplitude, terms, separation, weight, sums)
        return (pair * sums).sum(-1) / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, amplitude, terms, separation, weight, sums = ctx.saved_tensors
        n = amplitude.shape[-1]
        grad_amp = grad_terms = None
        if ctx.needs_input_grad[1]:
            s = sums.reshape(-1, n, n)
            grad_amp = grad[:, None] * (torch.einsum("bkl,bl->bk", s, amplitude)
                                        + torch.einsum("blk,bl->bk", s, amplitude)) / n
        if ctx.needs_input_grad[2]:
            qq, x, phase = _HigherOrders._parts(q, terms, separation)
            slope = x.expm1_().mul_(phase)  # (e^X − 1) cos(Q·d), (n², B, m)
            pair = (amplitude[:, :, None] * amplitude[:, None, :]).reshape(len(q), n * n)
            coefficient = (grad[:, None] * pair / n).T[:, :, None] * qq[None]  # (n², B, 9)
            grad_terms = torch.bmm(slope.transpose(1, 2), coefficient) * weight[..., None]
        return None, grad_amp, grad_terms, None, None
