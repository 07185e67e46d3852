"""TDSModel: diffuse intensity I(Q) in e.u. per atom from a force-constant source (docs/theory.md).

One interface, three methods:
- "one-phonon": I₁(Q), per-Q Cholesky solves (classical) or a degeneracy-safe matrix function (quantum), with the
  converged Debye–Waller factor (a Brillouin-zone mesh extrapolated in its size, `dw_mesh`);
- "gaussian":  all orders, exact for a harmonic crystal, converged by default: the diffuse intensity of a periodic
  crystal of L1×L2×L3 primitive cells, consistent in itself (its Debye–Waller factor, first order and higher
  orders all from its own q mesh), evaluated at any Q by a smooth window over the lattice (`LatticeWindow`);
  points near Bragg peaks use crystals two or three times as large. The grid is chosen for the crystal at construction
  (`converged_grid`) unless given;
- "sampling":  the published Monte-Carlo route, see `ase_tds.sampling`.

Why a periodic crystal's own Debye–Waller factor: its q mesh lacks the longest waves (the cell around Γ). An
infinite crystal has them, but a wave much longer than the range of the pair correlations moves neighbouring
atoms together: it lowers e^{−2W} and raises every e^{X} by the same factor, and the two cancel away from Bragg
peaks. Mixing a converged W with the grid's X breaks that cancellation (−1.6 % for Ni at L = 9); keeping both from
one grid makes the intensity converge fast in L (docs/theory.md, "Convergence").
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .chunks import map_chunks, matrix_chunk
from .covariance import ThermalCovariance
from .scattering import FormFactors, LatticeWindow, debye_waller_exponent, one_phonon_intensity
from .source import ForceConstantSource
from .structure import reciprocal_vectors, reduced_q

METHODS = ("one-phonon", "gaussian", "sampling")
# Grid selection (converged_grid): starting mesh spacing (Å⁻¹), the factor between candidates, the largest
# grid, and the relative change between a grid and one 1.5× larger that counts as converged.
START_SPACING = 0.45
GRID_STEP = 1.25
MAX_CELLS = 40
ACCURACY = 1e-3
# Near Bragg peaks the diffuse intensity varies on the scale of the mesh: a point closer to one than
# NEAR_BRAGG[k] mesh spacings uses the grid GRID_FACTORS[k + 1] times as large.
NEAR_BRAGG = (2.5, 1.25)
GRID_FACTORS = (1, 2, 3, 4)  # the last: only for points a fit finds too coarse (`levels` of `forward`)
# |Q| range of the probe points that choose the grid, Å⁻¹ (|Q| ≤ Q_MAX, or the data's largest |Q|)
Q_MAX = 8.0


class TDSModel(torch.nn.Module):
    """I(Q) (B,) e.u./atom at Cartesian Q (B, 3) Å⁻¹; differentiable in the force constants' θ.

    Args:
        force_constants: a `ForceConstantSource`: a ForceConstantModel (its θ is this module's only parameter) or
            PhonopyForceConstants (nothing trainable).
        temperature: K (> 0, or 0 with quantum statistics).
        method: "one-phonon" | "gaussian" | "sampling".
        statistics: "classical" | "quantum".
        form_factors (str | Mapping): "xraydb" or {symbol: constant or f(|Q|)} in e.u. (`FormFactors`).
        dw_mesh (int | str): the one-phonon model's Debye–Waller mesh: int m (meshes m³ and (2m)³,
            Richardson-extrapolated) or "grid" (the grid's own mesh).
        grid (tuple[int, int, int] | None): (L1, L2, L3) primitive cells of the gaussian model's periodic crystal;
            None chooses it (`converged_grid`: the smallest grid whose intensities change by less than `accuracy`
            on a 1.5× larger one, at probe points with |Q| ≤ q_max).
        sampler (DenseSampler | QSpaceSampler | None): an `ase_tds.sampling` sampler, for method="sampling"
            (it must share the force constants, temperature and statistics).
        chunk: Q per block (None: by matrix entries and terms per Q).
        refine: points within NEAR_BRAGG mesh spacings of a Bragg peak use grids 2 or 3 times as large
            (False: one grid, the exact periodic crystal at Q on its reciprocal lattice).
        accuracy: the relative change that counts as converged when the grid is chosen, in (0, 1).
        q_max: Å⁻¹, the largest |Q| of the probe points that choose the grid.

    Raises:
        ValueError: an unknown method or statistics, a temperature they cannot use, method="sampling" without a
            sampler, a bad dw_mesh, grid or accuracy, or form factors for symbols not in the crystal.
        UnstableError: choosing the grid met force constants that are not dynamically stable.
    """

    def __init__(self, force_constants: ForceConstantSource, temperature: float, method: str = "gaussian",
                 statistics: str = "quantum", form_factors="xraydb", dw_mesh=12, grid=None,
                 sampler=None, chunk: int | None = None, refine: bool = True, accuracy: float = ACCURACY,
                 q_max: float = Q_MAX):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        covariance = ThermalCovariance(force_constants, temperature, statistics)
        if method == "sampling" and sampler is None:
            raise ValueError("method='sampling' needs a sampler (ase_tds.sampling.DenseSampler or QSpaceSampler)")
        if not (dw_mesh == "grid" or (isinstance(dw_mesh, (int, np.integer)) and dw_mesh >= 1)):
            raise ValueError(f"dw_mesh must be a positive integer or 'grid', got {dw_mesh!r}")
        if not (np.isfinite(accuracy) and 0 < accuracy < 1):
            raise ValueError(f"accuracy must be a relative error in (0, 1), e.g. 1e-3; got {accuracy!r}")
        self.force_constants = force_constants
        self.covariance = covariance
        self.temperature = covariance.temperature
        self.method = method
        self.statistics = statistics
        self.form_factors = FormFactors(force_constants.primitive.get_chemical_symbols(), form_factors)
        self.dw_mesh = dw_mesh
        self.sampler = sampler
        self.refine = bool(refine)
        self.accuracy = float(accuracy)
        self._chunk = None if chunk is None else int(chunk)
        self._cache, self._windows = {}, {}
        self._shared = None  # inside covariance_once: {name: (value in θ's graph, its detached leaves)}
        if grid is None:
            grid = converged_grid(self, q_max) if method == "gaussian" else (1, 1, 1)
        self.grid = _check_grid(grid)

    # ------------------------------------------------------------------ pieces
    def _at_fixed_theta(self, name, compute):
        """compute() once per θ where no gradient is wanted (repeated evaluations at fixed force
        constants); in the graph whenever θ needs a gradient: recomputed at every call, or once inside
        `covariance_once`."""
        theta = self.force_constants.theta
        if torch.is_grad_enabled() and theta.requires_grad:
            if self._shared is None:
                return compute()
            if name not in self._shared:
                value = compute()
                self._shared[name] = (value, tuple(v.detach().requires_grad_(True) for v in value))
            return self._shared[name][1]
        key, value = self._cache.get(name, (None, None))
        if key is None or key.device != theta.device or not torch.equal(key, theta):
            key, value = theta.detach().clone(), compute()
            self._cache[name] = (key, value)
        return value

    def mean_square_displacement(self) -> torch.Tensor:
        """C_{κ0,κ0} (n, 3, 3) Å², converged in the Brillouin-zone mesh (`dw_mesh`): the crystal's Debye–Waller
        factor, used by the one-phonon model (the gaussian model uses its grid's own, `grid_covariance`).

        Returns:
            C_{κ0,κ0}, (n, 3, 3) Å².

        Raises:
            UnstableError: D(q) is not positive definite at some q of the mesh.
        """
        if self.dw_mesh == "grid":
            return self._at_fixed_theta("msd", lambda: (self.covariance.mean_square_displacement(self.grid),))[0]
        mesh = int(self.dw_mesh)
        return self._at_fixed_theta("msd", lambda: (self.covariance.converged_mean_square_displacement(mesh),))[0]

    def grid_covariance(self, level: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(C_{κ0,κ'l} (G, n, n, 3, 3) Å² of the crystal `level_grid(level)` in FFT order, and its self covariance
        (n, 3, 3) Å²).

        Args:
            level: the crystal, 0 the grid, k its GRID_FACTORS[k]-fold enlargement (`level_grid`).

        Returns:
            correlation: C_{κ0,κ'l}, (G, n, n, 3, 3) Å², G the number of cells of the crystal.
            self_covariance: C_{κ0,κ0}, (n, 3, 3) Å².

        Raises:
            UnstableError: D(q) is not positive definite at some q of the crystal's mesh.
        """
        def compute():
            crystal = self.covariance.real_space(self.level_grid(level))
            return crystal.correlation, crystal.self_covariance()

        return self._at_fixed_theta(f"grid{level}", compute)

    @contextlib.contextmanager
    def covariance_once(self):
        """Inside, the covariances that depend on θ alone (the gaussian model's real-space covariance of each crystal,
        the one-phonon model's Debye–Waller factor) enter θ's graph once, as leaves: gradients of many evaluations
        (a fit's chunks of points) collect on them, and on leaving one backward pass carries their sum to θ.
        Without it each chunk's backward pass would go through the covariance again."""
        self._shared = {}
        try:
            yield
            pairs = [(v, leaf.grad) for value, leaves in self._shared.values() for v, leaf in zip(value, leaves)
                     if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
        finally:
            self._shared = None

    def level_grid(self, level: int) -> tuple[int, int, int]:
        """The periodic crystal of `level`: `grid` × GRID_FACTORS[level] (levels > 0 near Bragg peaks).

        Args:
            level: 0 the grid, k its GRID_FACTORS[k]-fold enlargement.

        Returns:
            (L1, L2, L3) primitive cells.
        """
        return tuple(int(x) * GRID_FACTORS[level] for x in self.grid)

    def _window(self, level: int) -> LatticeWindow:
        fc = self.force_constants
        key = (level, fc.dtype, fc.device)
        if key not in self._windows:
            self._windows[key] = LatticeWindow(fc.primitive, self.level_grid(level), fc.dtype, fc.device)
        return self._windows[key]

    def levels(self, q: torch.Tensor) -> torch.Tensor:
        """(B,) the level each Q uses: k within NEAR_BRAGG[k − 1] mesh spacings of a Bragg peak (if `refine`), else 0.

        Args:
            q: Cartesian Q (B, 3) Å⁻¹.

        Returns:
            The level of each Q, (B,) int64.
        """
        level = torch.zeros(len(q), dtype=torch.long, device=q.device)
        if self.refine:
            distance = bragg_distance(self.force_constants.primitive, q) / self.mesh_spacing
            for k, near in enumerate(NEAR_BRAGG, start=1):
                level = torch.where(distance < near, k, level)
        return level

    @property
    def mesh_spacing(self) -> float:
        """The largest spacing of the grid's q mesh, Å⁻¹: |b_i| / L_i."""
        recip = np.linalg.norm(reciprocal_vectors(self.force_constants.primitive.cell[:]), axis=1)
        return float(np.max(recip / np.array(self.grid)))

    def amplitude(self, q: torch.Tensor, msd: torch.Tensor) -> torch.Tensor:
        """A_κ(Q) = f_κ(|Q|) e^{−W_κ(Q)}, (B, n) e.u., for q (B, 3) Å⁻¹ and msd (n, 3, 3) Å².

        Args:
            q: Cartesian Q (B, 3) Å⁻¹.
            msd: C_{κ0,κ0} (n, 3, 3) Å², the self covariance of each atom.

        Returns:
            A_κ(Q), (B, n) e.u.
        """
        return self.form_factors(torch.linalg.norm(q, dim=-1)) * torch.exp(-debye_waller_exponent(q, msd))

    def settings(self) -> dict:
        """What fixes this model's numbers (for records: fit.json, simulated files).

        Returns:
            method, statistics and temperature; for "gaussian" also grid, refine, accuracy and near_bragg_grids,
                for "one-phonon" dw_mesh.
        """
        out = dict(method=self.method, statistics=self.statistics, temperature=self.temperature)
        if self.method == "gaussian":
            out.update(grid=list(self.grid), refine=self.refine, accuracy=self.accuracy,
                       near_bragg_grids=[list(self.level_grid(k)) for k in range(1, len(NEAR_BRAGG) + 1)]
                       if self.refine else [])
        if self.method == "one-phonon":
            out.update(dw_mesh=self.dw_mesh)
        return out

    # ------------------------------------------------------------------ intensities
    def forward(self, q, levels=None) -> torch.Tensor:
        """I(Q) (B,) in e.u./atom at Cartesian q (B, 3) Å⁻¹ (array or tensor; reshaped to (-1, 3)).

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹ (reshaped to (-1, 3)).
            levels (array_like | torch.Tensor | None): (B,) int, the crystal each Q uses (gaussian model; None:
                `levels(q)`): 0 the grid, k its GRID_FACTORS[k]-fold enlargement.

        Returns:
            I(Q), (B,) e.u. per atom.

        Raises:
            ValueError: levels that are not one integer per Q in 0..len(GRID_FACTORS) − 1.
            UnstableError: the force constants are not dynamically stable.
        """
        fc = self.force_constants
        q = torch.as_tensor(q, dtype=fc.dtype, device=fc.device).reshape(-1, 3)
        if self.method == "sampling":
            return self.sampler.intensity(self, q)[0]
        if self.method == "one-phonon":
            amplitude = self.amplitude(q, self.mean_square_displacement())  # here: form factors may call xraydb
            return torch.cat(map_chunks(lambda qc, amp: one_phonon_intensity(self.covariance, qc, amp),
                                        (q, amplitude), self._chunk or matrix_chunk(fc.n_atoms)))
        levels = self.levels(q) if levels is None else torch.as_tensor(levels, device=q.device).reshape(-1)
        if len(levels) != len(q) or levels.min() < 0 or levels.max() >= len(GRID_FACTORS):
            raise ValueError(f"levels must be one integer per Q in 0..{len(GRID_FACTORS) - 1}")
        out = torch.zeros(len(q), dtype=q.dtype, device=q.device)
        for level in range(len(GRID_FACTORS)):
            pick = torch.nonzero(levels == level)[:, 0]
            if len(pick):
                out = out.index_put((pick,), self._all_orders(q[pick], level))
        return out

    def _all_orders(self, q: torch.Tensor, level: int) -> torch.Tensor:
        """The periodic crystal of `level`: I₁ with its own W, plus its windowed higher orders."""
        fc = self.force_constants
        correlation, self_cov = self.grid_covariance(level)
        window = self._window(level)
        terms = window.gather(correlation)
        amplitude = self.amplitude(q, self_cov)
        first = map_chunks(lambda qc, amp: one_phonon_intensity(self.covariance, qc, amp),
                           (q, amplitude), self._chunk or matrix_chunk(fc.n_atoms))
        higher = map_chunks(lambda qc, amp: window.intensity(qc, amp, terms), (q, amplitude),
                            self._chunk or max(2**21 // window.n_terms, 8))
        return torch.cat(first) + torch.cat(higher)

    def intensity_hkl(self, hkl, cell=None) -> torch.Tensor:
        """I (N,) e.u./atom at hkl (N, 3) in r.l.u. of `cell` (3, 3) Å (default: the force constants' unit cell).

        Args:
            hkl (array_like): (N, 3) r.l.u. of `cell`.
            cell (array_like | None): (3, 3) Å, rows the lattice vectors; None: the force constants' `unitcell`.

        Returns:
            I, (N,) e.u. per atom.
        """
        return self(self.force_constants.q_from_hkl(np.asarray(hkl, dtype=float), cell))

    @torch.no_grad()
    def discretisation_error(self, q, levels=None, signed: bool = False) -> torch.Tensor:
        """Estimated error (B,) e.u./atom of I(Q) from the finite grid: |I − I'| with I' from grids 1.5× larger
        at the same `levels` (zero for the one-phonon model, whose Debye–Waller mesh is extrapolated, and for
        sampling).

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹ (reshaped to (-1, 3)).
            levels (array_like | torch.Tensor | None): (B,) the crystal each Q uses, as in `forward`; None:
                `levels(q)`.
            signed: give I − I' itself (its sign says which way the model errs; `fit` propagates it to θ).

        Returns:
            |I − I'| (or I − I'), (B,) e.u. per atom.
        """
        fc = self.force_constants
        q = torch.as_tensor(q, dtype=fc.dtype, device=fc.device).reshape(-1, 3)
        if self.method != "gaussian":
            return torch.zeros(len(q), dtype=q.dtype, device=q.device)
        levels = self.levels(q) if levels is None else levels
        finer = self.with_grid(tuple(int(np.ceil(1.5 * x)) for x in self.grid))
        difference = self(q, levels) - finer(q, levels)
        return difference if signed else torch.abs(difference)

    def with_grid(self, grid) -> TDSModel:
        """This model with another grid (same force constants, temperature, statistics and options).

        Args:
            grid (tuple[int, int, int] | None): (L1, L2, L3) primitive cells; None: chosen by `converged_grid`.

        Returns:
            A new TDSModel.
        """
        return TDSModel(self.force_constants, self.temperature, self.method, self.statistics,
                        self.form_factors.source, self.dw_mesh, grid, self.sampler, self._chunk, self.refine,
                        self.accuracy)


def _check_grid(grid) -> tuple[int, int, int]:
    try:
        grid = tuple(int(x) for x in np.ravel(grid))
    except (TypeError, ValueError):
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive numbers of primitive cells (L1, L2, L3), got {grid!r}")
    return grid


def bragg_distance(primitive, q: torch.Tensor) -> torch.Tensor:
    """|Q − G| (B,) Å⁻¹ to the nearest reciprocal-lattice vector G of the primitive cell, for q (B, 3) Å⁻¹.

    Args:
        primitive (ase.Atoms): the primitive cell.
        q: Cartesian Q (B, 3) Å⁻¹.

    Returns:
        |Q − G|, (B,) Å⁻¹.
    """
    recip = torch.as_tensor(reciprocal_vectors(primitive.cell[:]), dtype=q.dtype, device=q.device)
    nearest = torch.round(reduced_q(q, primitive.cell[:]))
    offsets = torch.as_tensor(np.array(np.meshgrid(*3 * [[-1, 0, 1]], indexing="ij")).reshape(3, -1).T,
                              dtype=q.dtype, device=q.device)
    g = (nearest[:, None, :] + offsets[None]) @ recip
    return torch.linalg.norm(q[:, None, :] - g, dim=-1).min(dim=1).values


def probe_q(primitive, q_max: float, count: int = 192, seed: int = 0) -> np.ndarray:
    """Cartesian Q (count, 3) Å⁻¹, uniform in the ball |Q| ≤ q_max, at least a quarter of the shortest reciprocal
    vector from any Bragg peak: where the grid alone (no refinement) must be converged.

    Args:
        primitive (ase.Atoms): the primitive cell.
        q_max: Å⁻¹, the radius of the ball.
        count: the number of points.
        seed: of the random number generator (the same points for the same arguments).

    Returns:
        Cartesian Q (count, 3) Å⁻¹.
    """
    rng = np.random.default_rng(seed)
    far = 0.25 * np.linalg.norm(reciprocal_vectors(primitive.cell[:]), axis=1).min()
    out = np.zeros((0, 3))
    while len(out) < count:
        x = rng.normal(size=(4 * count, 3))
        x *= (q_max * rng.uniform(0.2, 1.0, size=len(x)) ** (1 / 3) / np.linalg.norm(x, axis=1))[:, None]
        keep = bragg_distance(primitive, torch.as_tensor(x)).numpy() > far
        out = np.concatenate([out, x[keep]])
    return out[:count]


@torch.no_grad()
def converged_grid(tds: TDSModel, q_max: float = Q_MAX) -> tuple[int, int, int]:
    """The smallest grid (mesh spacing START_SPACING Å⁻¹, then ÷ GRID_STEP) whose intensities at the probe points
    (`probe_q`) change by at most `tds.accuracy` (relative, largest) on a grid 1.5× larger; at most MAX_CELLS
    cells per axis. Uses the force constants as they are at the call (a fit: its start).

    Args:
        tds: the model whose grid is chosen (its force constants, method options and `accuracy`).
        q_max: Å⁻¹, the largest |Q| of the probe points.

    Returns:
        (L1, L2, L3) primitive cells.

    Raises:
        UnstableError: the force constants are not dynamically stable.
    """
    fc = tds.force_constants
    recip = np.linalg.norm(reciprocal_vectors(fc.primitive.cell[:]), axis=1)
    q = torch.as_tensor(probe_q(fc.primitive, q_max), dtype=fc.dtype, device=fc.device)
    spacing = START_SPACING
    while True:
        grid = tuple(int(x) for x in np.minimum(np.ceil(recip / spacing), MAX_CELLS))
        if max(grid) >= MAX_CELLS:
            return grid
        single = tds.with_grid(grid)
        single.refine = False
        coarse = single(q)
        single = single.with_grid(tuple(int(np.ceil(1.5 * x)) for x in grid))
        change = torch.abs(coarse / single(q) - 1).max().item()
        if change <= tds.accuracy:
            return grid
        spacing /= GRID_STEP
