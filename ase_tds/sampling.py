"""Thermal displacements of a periodic supercell, and the published sampling estimator of I(Q) (docs/theory.md).

The supercell is L1×L2×L3 copies of the force-constant model's unit cell (`model.unitcell`, e.g. the
conventional cell whose r.l.u. the data use), atoms ordered cell by cell (C order over l1, l2, l3), the
unit-cell atom fastest: N = L1·L2·L3·n_unit. Both samplers draw u (S, N, 3) Å from one Gaussian, with
the centre of mass fixed (the three mass-weighted rigid translations removed), classically of
covariance k_BT·M^{-1/2} D⁺ M^{-1/2}, D = M^{-1/2} H M^{-1/2} the mass-weighted supercell Hessian:

- DenseSampler:  u = M^{-1/2} (1 − P) √(k_BT) L⁻ᵀ z with D + cP = LLᵀ: the reference, O(N³);
- QSpaceSampler: per commensurate q a square root of C̃(q) times the Fourier transform of z, then an
  inverse FFT: the same distribution in O(N log N), classical or quantum.

With Born charges (`model.born`) both add the dipole–dipole force constants of the periodic supercell (phonopy's
FC_dd, `ase_tds.dipole.dipole_force_constants`): DenseSampler to H, QSpaceSampler as their D(q) on its grid.

u is a differentiable function of θ for fixed white noise z ~ N(0, 1) (the reparameterisation trick).
A pair longer than half the supercell wraps around it (its images are summed), as in any periodic cell.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .covariance import ThermalCovariance, UnstableError, gamma_lift, translation_projector
from .dynamical import assemble_dynamical_matrix, fold_pairs, group_by_block
from .scattering import debye_waller_exponent
from .structure import diagonal_supercell_for, reduced_q


# the largest repetition `commensurate_supercell` searches
MAX_REPEAT = 48


def commensurate_supercell(model, q, max_repeat: int = MAX_REPEAT) -> tuple[int, int, int]:
    """The smallest L1×L2×L3 repetition of `model.unitcell` that has every Q on its reciprocal lattice (hkl·L
    integer) and holds the force-constant cutoff: the supercell a sampler needs for these points.

    Args:
        model (ForceConstantModel): the force constants (their unit cell and cutoff).
        q (array_like): Cartesian Q (N, 3) Å⁻¹.
        max_repeat: the largest repetition searched per axis.

    Returns:
        (L1, L2, L3).

    Raises:
        ValueError: some hkl are not multiples of 1/L for any L ≤ max_repeat.
    """
    cell = np.array(model.unitcell.cell[:])
    hkl = reduced_q(np.asarray(q, dtype=float).reshape(-1, 3), cell)
    least = np.diag(diagonal_supercell_for(cell, model.cutoff))
    reps = []
    for h, name in zip(hkl.T, "hkl"):
        step = next((L for L in range(1, max_repeat + 1) if np.abs(h * L - np.round(h * L)).max(initial=0.0) <= 1e-6),
                    None)
        if step is None:
            raise ValueError(f"sampling model: the points' {name} (r.l.u. of the unit cell) are not multiples of "
                             f"1/L for any L ≤ {max_repeat}, and a periodic L1×L2×L3 supercell sees only Q with hkl·L "
                             "integer; give a supercell (--supercell A B C) matching the data's grid, or use the "
                             "gaussian model (any Q)")
        reps.append(int(step * -(-least[len(reps)] // step)))  # the least multiple of step holding the cutoff
    return tuple(reps)


class _Sampler:
    """What both samplers share: the supercell, drawing noise, and the intensity estimator."""

    def __init__(self, model, supercell, temperature: float, statistics: str = "classical",
                 n_samples: int = 64, seed: int | None = None, progress: bool = True, chunk: int = 2**21):
        if getattr(model, "far", None) is not None:
            model.short_range_only("a sampler's supercell Hessian")
        self.covariance = ThermalCovariance(model, temperature, statistics)
        supercell = tuple(int(x) for x in np.ravel(supercell))
        if len(supercell) != 3 or min(supercell) < 1:
            raise ValueError(f"supercell must be three positive repetitions (L1, L2, L3), got {supercell!r}")
        self.model = model
        self.supercell = supercell
        self.temperature = self.covariance.temperature
        self.statistics = statistics
        self.n_samples = int(n_samples)
        self.seed = seed
        self.progress = progress
        self.chunk = int(chunk)
        unit = model.unitcell
        self.unit_cell = np.array(unit.cell[:])
        self.unit_sites = model.site_of(unit.positions)  # (n_unit,) primitive atom κ of each unit-cell atom
        cells = np.stack(np.meshgrid(*map(np.arange, supercell), indexing="ij"), -1).reshape(-1, 3)
        self.n_cells = len(cells)
        self.cell = np.diag(supercell) @ self.unit_cell
        self.positions = ((cells @ self.unit_cell)[:, None, :] + unit.positions[None]).reshape(-1, 3)
        self.symbols = list(unit.get_chemical_symbols()) * self.n_cells

    @property
    def n_atoms(self) -> int:
        """N, the number of atoms in the supercell."""
        return len(self.positions)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.model.primitive.get_chemical_formula()}, supercell="
                f"{'×'.join(map(str, self.supercell))} unit cells = {self.n_atoms} atoms, "
                f"{self.temperature:g} K, {self.statistics})")

    def _tensor(self, array) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=self.model.dtype, device=self.model.device)

    def _unit_masses(self) -> torch.Tensor:
        """Masses (n_unit,) amu of the unit-cell atoms."""
        return self.model.masses[torch.as_tensor(self.unit_sites, device=self.model.masses.device)]

    # ------------------------------------------------------------------ drawing
    def _generator(self, generator):
        if generator is None and self.seed is not None:
            return torch.Generator(device=self.model.device).manual_seed(int(self.seed))
        return generator

    def _noise(self, n_samples: int, generator) -> torch.Tensor:
        return torch.randn(n_samples, self.n_atoms, 3, generator=generator, dtype=self.model.dtype,
                           device=self.model.device)

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """u (S, N, 3) Å, differentiable in θ. With `seed` set and no generator, the same z every call.

        Args:
            n_samples: S.
            generator: the random numbers of z; None: seeded with `seed` when set, else torch's global generator.

        Returns:
            u (S, N, 3) Å.

        Raises:
            UnstableError: the force constants are not dynamically stable at a commensurate q.
        """
        return self._transform(self._factor(), self._noise(int(n_samples), self._generator(generator)))

    def displacements(self, z: torch.Tensor) -> torch.Tensor:
        """u (S, N, 3) Å from given white noise z (S, N, 3): the reparameterised map, linear in z.

        Args:
            z: white noise (S, N, 3), N(0, 1) (array or tensor).

        Returns:
            u (S, N, 3) Å.

        Raises:
            UnstableError: the force constants are not dynamically stable at a commensurate q.
        """
        return self._transform(self._factor(), torch.as_tensor(z, dtype=self.model.dtype, device=self.model.device))

    def mean_square_displacement(self) -> torch.Tensor:
        """⟨u uᵀ⟩ (n_unit, 3, 3) Å² of each unit-cell atom in this supercell: the covariance sampled from.

        Returns:
            ⟨u uᵀ⟩, (n_unit, 3, 3) Å².

        Raises:
            UnstableError: the force constants are not dynamically stable at a commensurate q.
        """
        return self._msd(self._factor())

    # ------------------------------------------------------------------ the estimator
    def _hkl(self, q) -> np.ndarray:
        """hkl (B, 3) in r.l.u. of the unit cell for Cartesian Q (B, 3) Å⁻¹ (array or tensor)."""
        return reduced_q(np.asarray(torch.as_tensor(q).detach().cpu(), dtype=float).reshape(-1, 3), self.unit_cell)

    def check_q(self, q) -> None:
        """Refuse Q (B, 3) Å⁻¹ off this supercell's reciprocal lattice (hkl·L not integer, to 1e-6).

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹.

        Raises:
            ValueError: some Q are off the supercell's reciprocal lattice (the message names the first).
        """
        hkl = self._hkl(q)
        scaled = hkl * np.array(self.supercell)
        bad = np.nonzero(np.abs(scaled - np.round(scaled)).max(axis=1) > 1e-6)[0]
        if len(bad):
            i = int(bad[0])
            size = "×".join(map(str, self.supercell))
            raise ValueError(
                f"Q[{i}] (hkl = {np.round(hkl[i], 6).tolist()} in r.l.u. of the unit cell) is not on the reciprocal "
                f"lattice of the {size} supercell: a periodic supercell only supports Q with hkl·L integer "
                f"(L = {self.supercell}); {len(bad)} of {len(hkl)} Q are off it. Choose Q on that lattice or a "
                "supercell whose repetitions are multiples of the hkl denominators.")

    def distinct_q(self, q) -> int:
        """How many distinct ±q, q = Q mod the unit cell's reciprocal lattice, the Q (B, 3) Å⁻¹ on this
        supercell's lattice probe: Q with one q see the same sampled modes (and with −q the same intensity,
        real form factors), so their Monte-Carlo errors are correlated.

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹ on this supercell's reciprocal lattice.

        Returns:
            The number of distinct ±q.
        """
        hkl = self._hkl(q)
        size = np.array(self.supercell)
        steps = np.round(hkl * size).astype(int) % size
        keys = np.stack([steps @ size ** np.arange(3), (-steps % size) @ size ** np.arange(3)])
        return len(np.unique(keys.min(axis=0)))

    def intensity(self, form_factors, q, n_samples: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffuse I(Q) in e.u. per atom at Cartesian Q (B, 3) Å⁻¹: (mean (B,), standard error (B,)).

        mean = ⟨|Σ_j f_j e^{iQ·(R_j+u_j)}|²⟩/N over S samples − |Σ_j f_j e^{iQ·R_j} e^{−W_j}|²/N, with W from
        this supercell's own covariance; stderr = sample std/√S.
        Differentiable in θ through u (reparameterisation) and through W.

        Args:
            form_factors (FormFactors): f_κ(|Q|) of the primitive cell's atoms, e.u.
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹ on this supercell's reciprocal lattice.
            n_samples: S ≥ 2; None: the sampler's `n_samples`.
            generator: the random numbers of z; None: seeded with `seed` when set, else torch's global generator.

        Returns:
            mean: I(Q), (B,) e.u. per atom.
            stderr: its Monte-Carlo standard error, (B,) e.u. per atom (no gradient).

        Raises:
            ValueError: Q off the supercell's reciprocal lattice, or n_samples < 2.
            UnstableError: the force constants are not dynamically stable at a commensurate q.
        """
        q = torch.as_tensor(q, dtype=self.model.dtype, device=self.model.device).reshape(-1, 3)
        self.check_q(q)
        n_samples = self.n_samples if n_samples is None else int(n_samples)
        if n_samples < 2:
            raise ValueError(f"n_samples must be ≥ 2 for a standard error, got {n_samples}")
        generator = self._generator(generator)
        factor = self._factor()
        form = form_factors(torch.linalg.norm(q, dim=-1))[:, self.unit_sites]  # (B, n_unit)
        ideal = self._tensor(self.positions).reshape(self.n_cells, -1, 3)
        amp_bragg = form * torch.exp(-debye_waller_exponent(q, self._msd(factor)))
        bragg = _ScatteredPower.apply(q, ideal, amp_bragg, self.chunk) / self.n_atoms
        batch = max(1, 2**22 // (3 * self.n_atoms))
        per_sample = []
        with tqdm(total=n_samples, desc="thermal samples", leave=False,
                  disable=not self.progress or n_samples < 16) as bar:
            for start in range(0, n_samples, batch):
                u = self._transform(factor, self._noise(min(batch, n_samples - start), generator))
                for one in u:
                    x = ideal + one.reshape(ideal.shape)
                    per_sample.append(_ScatteredPower.apply(q, x, form, self.chunk) / self.n_atoms)
                    bar.update()
        per_sample = torch.stack(per_sample)  # (S, B)
        return per_sample.mean(0) - bragg, per_sample.detach().std(0) / np.sqrt(n_samples)


class DenseSampler(_Sampler):
    """The reference sampler: dense Cholesky of the mass-weighted supercell Hessian (classical only).

    Memory O(N²), time O(N³).

    Args:
        model (ForceConstantModel): the force constants; their `unitcell` is repeated.
        supercell (tuple[int, int, int]): (L1, L2, L3) repetitions of the unit cell.
        temperature: K.
        statistics: "classical" (the only statistics this sampler draws).
        **kwargs (Any): the keyword arguments below.

    Keyword Args:
        n_samples (int): S, the default number of samples of `intensity` (64).
        seed (int | None): fixed noise: the same z at every call without a generator (common random numbers, a
            deterministic function of θ); None: fresh noise from torch's global generator.
        progress (bool): show a progress bar over the samples of `intensity` (from 16 samples on).
        chunk (int): elements per block of the Q × atom phase sums (2²¹).

    Raises:
        ValueError: a supercell that is not three positive repetitions, statistics other than classical, or a
            temperature that is not > 0 K.
    """

    def __init__(self, model, supercell, temperature: float, statistics: str = "classical", **kwargs):
        if statistics != "classical":
            raise ValueError(f"DenseSampler draws classical displacements only (got statistics={statistics!r}); "
                             "for quantum statistics use QSpaceSampler(model, supercell, T, statistics='quantum')")
        super().__init__(model, supercell, temperature, statistics, **kwargs)
        self._entries = model.supercell_columns(self.positions, self.cell, np.arange(self.n_atoms))

    def hessian(self) -> torch.Tensor:
        """H (3N, 3N) eV/Å², layout (atom, Cartesian), from folding the model's pairs onto the supercell; with Born
        charges, plus their dipole–dipole force constants of this periodic supercell (`dipole_force_constants`).

        Returns:
            H, (3N, 3N) eV/Å².
        """
        n = self.n_atoms
        full = fold_pairs(self.model.pair_force_constants(), self._entries, n, n)
        if getattr(self.model, "born", None) is not None:
            from ase import Atoms

            from .dipole import dipole_force_constants

            supercell = Atoms(self.symbols, positions=self.positions, cell=self.cell, pbc=True)
            full = full + dipole_force_constants(supercell, self.model.primitive, self.model.born_charges(), "full")
        return full.permute(0, 2, 1, 3).reshape(3 * n, 3 * n)

    def _masses(self) -> torch.Tensor:
        return self._unit_masses().repeat(self.n_cells)

    def _factor(self):
        """(L (3N, 3N) with D + cP = LLᵀ, c)."""
        masses = self._masses()
        inv_sqrt_m = (1.0 / torch.sqrt(masses)).repeat_interleave(3)
        dyn = self.hessian() * inv_sqrt_m[:, None] * inv_sqrt_m[None, :]
        c = gamma_lift(dyn)  # in the graph: u(θ) depends on c, its distribution not
        chol, info = torch.linalg.cholesky_ex(dyn + c * translation_projector(masses))
        if info > 0:
            raise UnstableError("the supercell Hessian is not positive definite beyond the three translations "
                                "(imaginary modes at a commensurate q)")
        return chol, c

    def _transform(self, factor, z: torch.Tensor) -> torch.Tensor:
        chol, _ = factor
        masses = self._masses()
        n_samples = len(z)
        y = torch.linalg.solve_triangular(chol.mT, z.reshape(n_samples, -1).T, upper=True)
        y = np.sqrt(self.covariance.kbt) * y.T.reshape(n_samples, self.n_atoms, 3)
        t = torch.sqrt(masses / masses.sum())  # the mass-weighted translations: (1 − P) y
        y = y - t[:, None] * torch.einsum("j,sja->sa", t, y)[:, None, :]
        return y / torch.sqrt(masses)[:, None]

    def _msd(self, factor) -> torch.Tensor:
        """From the blocks of the unit cell at the origin (the covariance is translation invariant)."""
        chol, c = factor
        masses = self._masses()[:len(self.unit_sites)]
        k = 3 * len(masses)
        columns = torch.cholesky_solve(torch.eye(len(chol), k, dtype=chol.dtype, device=chol.device), chol)
        blocks = torch.diagonal(columns[:k].reshape(len(masses), 3, len(masses), 3), dim1=0, dim2=2)
        eye = torch.eye(3, dtype=chol.dtype, device=chol.device)
        blocks = blocks.permute(2, 0, 1) - (masses / self._masses().sum() / c)[:, None, None] * eye  # − P/c: D⁺
        return self.covariance.kbt * blocks / masses[:, None, None]


class QSpaceSampler(_Sampler):
    """The same distribution in O(N log N), by square roots of C̃(q) on the supercell's q grid and FFTs.

    QSpaceSampler(model, supercell=(L1, L2, L3), temperature, statistics="classical" | "quantum").
    Per q of the Γ-centred L1×L2×L3 grid of the unit cell's reciprocal lattice (half of it: real u),
    S(q) with S S† = M^{1/2} C̃(q) M^{1/2} in the cell-origin phase convention: √(k_BT) L⁻† for
    D(q) = LL† (classical) or the Cholesky factor of h(D) (quantum); at Γ the translations are lifted
    and projected out. With Born charges D(q) carries the dipole–dipole term of this periodic supercell
    (`unit_dipole_matrix`), DenseSampler's FC_dd: both samplers draw from one distribution.

    Args:
        model (ForceConstantModel): the force constants; their `unitcell` is repeated.
        supercell (tuple[int, int, int]): (L1, L2, L3) repetitions of the unit cell.
        temperature: K (> 0, or 0 with quantum statistics).
        statistics: "classical" (the default) or "quantum".
        **kwargs (Any): n_samples, seed, progress and chunk, as for DenseSampler.

    Raises:
        ValueError: a supercell that is not three positive repetitions, unknown statistics, or a temperature they
            cannot use.
    """

    def __init__(self, model, supercell, temperature: float, statistics: str = "classical", **kwargs):
        super().__init__(model, supercell, temperature, statistics, **kwargs)
        unit = model.unitcell
        n_unit = len(unit)
        rows, pairs, cols = model.supercell_columns(unit.positions, self.unit_cell, np.arange(n_unit)).T
        shift = (unit.positions[rows] + model.basis.vectors[pairs] - unit.positions[cols]) @ np.linalg.inv(self.unit_cell)
        # each pair p of unit-cell atom a lands on atom b of the unit cell n: d_p = n·A + r_b − r_a
        self._slots, self._filled = group_by_block(rows * n_unit + cols, n_unit)
        self._block_rows, self._block_cols, self._block_pairs = rows[self._slots], cols[self._slots], pairs[self._slots]
        self._block_lattice = np.round(shift)[self._slots] * self._filled[..., None]  # (n_unit², m, 3)
        l1, l2, l3 = self.supercell
        m = np.stack(np.meshgrid(np.arange(l1), np.arange(l2), np.arange(l3 // 2 + 1), indexing="ij"), -1).reshape(-1, 3)
        self._q_frac = m / np.array(self.supercell)  # (Q, 3) reduced, the rfftn half of the grid
        self._q_weight = np.where((m[:, 2] == 0) | (2 * m[:, 2] == l3), 1.0, 2.0)  # q and −q both stand for it
        self._dipole_points = None  # the supercell's commensurate q' of the dipole term (`_dipole_geometry`)

    @property
    def _polar(self) -> bool:
        return getattr(self.model, "born", None) is not None

    def unit_dynamical_matrix(self, q_frac) -> torch.Tensor:
        """D(q) (B, 3n_unit, 3n_unit) complex, eV/Å²/amu, of the unit cell in the cell-origin convention.

        D_ab(q) = Σ_p Φ_p e^{iq·n_p·A}/√(m_a m_b), q_frac (B, 3) in r.l.u. of the unit cell: the
        phase-from-positions D(q) times e^{−iq·(r_b − r_a)}, periodic in the unit reciprocal lattice.
        With Born charges plus the dipole–dipole term of this periodic supercell (`unit_dipole_matrix`),
        defined on its grid only.

        Args:
            q_frac (array_like): q (B, 3) in r.l.u. of the unit cell (with Born charges: on the supercell's grid).

        Returns:
            D(q), (B, 3n_unit, 3n_unit) complex, eV/Å²/amu.

        Raises:
            ValueError: with Born charges, a q off the supercell's grid.
        """
        return self._unit_matrix(q_frac, self.unit_dipole_matrix() if self._polar else None)

    def _unit_matrix(self, q_frac, dipole: torch.Tensor | None) -> torch.Tensor:
        """D(q) (B, 3n_unit, 3n_unit) at q_frac (B, 3): the pairs' plus `dipole` (Q, …) on the half grid, or none."""
        q_frac = np.asarray(q_frac, dtype=float).reshape(-1, 3)
        masses = self._unit_masses()
        angle = 2 * np.pi * torch.einsum("ba,kma->bkm", self._tensor(q_frac), self._tensor(self._block_lattice))
        rows, cols = (torch.as_tensor(x, device=masses.device) for x in (self._block_rows, self._block_cols))
        inv_sqrt_m = self._tensor(self._filled) / torch.sqrt(masses[rows] * masses[cols])
        weighted = self.model.pair_force_constants()[self._block_pairs] * inv_sqrt_m[..., None, None]
        dyn = assemble_dynamical_matrix(angle, weighted, len(masses))
        if dipole is None:
            return dyn
        index, flip = self._half_index(q_frac)
        part = dipole[torch.as_tensor(index, device=dipole.device)]
        return dyn + torch.where(torch.as_tensor(flip, device=part.device)[:, None, None], part.conj(), part)

    def _half_index(self, q_frac) -> tuple[np.ndarray, np.ndarray]:
        """(row of the half grid `_q_frac` (B,), True where that row is −q: D(q) = D(−q)*) of grid q (B, 3).

        Raises:
            ValueError: a q off the supercell's grid (q·L not integer, to 1e-6).
        """
        size = np.array(self.supercell)
        scaled = np.asarray(q_frac, dtype=float).reshape(-1, 3) * size
        if np.abs(scaled - np.round(scaled)).max(initial=0.0) > 1e-6:
            raise ValueError("with Born charges the unit cell's D(q) is that of the periodic supercell: q (r.l.u. of "
                             f"the unit cell) must lie on its {'×'.join(map(str, self.supercell))} grid (q·L integer)")
        k = np.round(scaled).astype(int) % size
        flip = k[:, 2] > size[2] // 2
        k = np.where(flip[:, None], -k % size, k)
        return (k[:, 0] * size[1] + k[:, 1]) * (size[2] // 2 + 1) + k[:, 2], flip

    def _dipole_geometry(self):
        """The supercell's commensurate q' at phonopy's representatives (as `dipole_force_constants` sums them):
        Cartesian (P, 3) Å⁻¹, `_half_index` of q' and of −q' (r.l.u. of the unit cell), and m, primitive cells per
        unit cell."""
        if self._dipole_points is None:
            from .dipole import commensurate_points

            pcell = np.array(self.model.primitive.cell[:], dtype=float)
            smat = np.rint(self.cell @ np.linalg.inv(pcell)).astype(int).T  # as `dipole_force_constants` takes it
            q_red = commensurate_points(pcell, smat)
            hkl = q_red @ (self.unit_cell @ np.linalg.inv(pcell)).T
            self._dipole_points = (2 * np.pi * q_red @ np.linalg.inv(pcell).T, self._half_index(hkl),
                                   self._half_index(-hkl), len(q_red) // self.n_cells)
        return self._dipole_points

    def unit_dipole_matrix(self) -> torch.Tensor:
        """D_dd(q) (Q, 3n_unit, 3n_unit) complex, eV/Å²/amu, on the half grid `_q_frac` in the cell-origin convention:
        the Fourier transform D_ab(q) = Σ_n FC_dd(a0, bn) e^{iq·n·A}/√(m_a m_b) of this periodic supercell's
        dipole–dipole force constants (`ase_tds.dipole.dipole_force_constants`, DenseSampler's).

        FC_dd is the real part of the sum of C_dd(q') (phases from positions) over the supercell's commensurate q',
        so D_ab(q) = ½[X_ab(q) + X_ab(−q)*], X_ab(q) = (1/m) Σ_{q' ≡ q} C_dd(q')_{κa κb} e^{iq'·(r_a − r_b)}/√(m_a m_b)
        over the m q' = q + g (g of the unit cell's reciprocal lattice, modulo the primitive one) at phonopy's
        first-zone representatives; κa the primitive site of unit-cell atom a. At Γ the non-analytic term is left
        out (as in FC_dd). Differentiable in fitted charges; the unit-charge sums (`_unit_charge_kernel`) are done
        once per ε∞ and contracted with Z* per call.

        Returns:
            D_dd, (Q, 3n_unit, 3n_unit) complex, eV/Å²/amu.
        """
        from .dipole import DipoleKernel, contract_charges

        born = self.model.born_charges()
        q, (index, flip), (minus_index, minus_flip), m = self._dipole_geometry()
        kernel = self._unit_charge_kernel(born)
        n_unit, n = len(self.unit_sites), len(self.model.primitive)
        sites = torch.as_tensor(self.unit_sites, device=born.charges.device)
        masses = self._unit_masses()
        weight = (0.5 / m / torch.sqrt(masses[:, None] * masses[None, :]))[:, None, :, None]  # (n_unit, 1, n_unit, 1)
        positions = self._tensor(self.model.unitcell.positions)
        out = torch.zeros(len(self._q_frac), n_unit, 3, n_unit, 3, dtype=born.charges.dtype.to_complex(),
                          device=born.charges.device)
        step = max(1, self.chunk // (9 * max(n_unit, n) ** 2))
        for start in range(0, len(q), step):
            part = slice(start, start + step)
            qs = self._tensor(q[part])
            blocks = contract_charges(DipoleKernel(kernel.total[part], kernel.zero), born.charges)
            blocks = blocks.reshape(-1, n, 3, n, 3)
            phase = torch.polar(torch.ones(len(qs), n_unit, dtype=qs.dtype, device=qs.device), qs @ positions.T)
            term = blocks[:, sites][:, :, :, sites] * weight * (phase[:, :, None, None, None]
                                                                * phase.conj()[:, None, None, :, None])
            # ½X(q') goes to q and ½X(q')* to −q, where the half grid holds them (elsewhere D(−q) = D(q)*)
            for rows, other, value in ((index[part], flip[part], term),
                                       (minus_index[part], minus_flip[part], term.conj())):
                keep = torch.as_tensor(np.flatnonzero(~other), device=out.device)
                out = out.index_add(0, torch.as_tensor(rows, device=out.device)[keep], value[keep])
        return out.reshape(len(self._q_frac), 3 * n_unit, 3 * n_unit)

    def _unit_charge_kernel(self, born):
        """`ase_tds.dipole.dipole_kernel` of the commensurate q' (`_dipole_geometry`) summed around q' as given
        (phonopy's FC_dd): from the process's cache at a fixed ε∞ (`source.cached_dipole_kernel`), in θ's graph where
        ε∞ is fitted."""
        from .dipole import dipole_kernel
        from .source import cached_dipole_kernel

        q = self._tensor(self._dipole_geometry()[0])
        if born.epsilon.requires_grad:
            return dipole_kernel(q, self.model.primitive, born, reduce=False)
        return cached_dipole_kernel(q, self.model.primitive, born, reduce=False)

    def _factor(self) -> torch.Tensor:
        """M^{-1/2} S(q) (Q, 3n_unit, 3n_unit) complex, Å·√amu per √amu: (M^{-1/2}S)(M^{-1/2}S)† = C̃(q)."""
        masses = self._unit_masses()
        proj = translation_projector(masses)
        inv_sqrt_m = (1.0 / torch.sqrt(masses)).repeat_interleave(3)
        step = max(1, self.chunk // max(self._filled.size, 9 * len(masses) ** 2))  # q per block
        dipole = self.unit_dipole_matrix() if self._polar else None
        # the lift at Γ, in the graph: u(θ) depends on c, its distribution not
        c = gamma_lift(self._unit_matrix(np.zeros((1, 3)), dipole))
        roots = []
        for start in range(0, len(self._q_frac), step):
            frac = self._q_frac[start:start + step]
            gamma = self._tensor(np.all(frac == 0, axis=1))[:, None, None]
            at_gamma = gamma * proj if gamma.any() else None  # P at Γ, zero elsewhere
            dyn = self._unit_matrix(frac, dipole)
            root = self.covariance.square_root(dyn if at_gamma is None else dyn + c * at_gamma, at_gamma)
            roots.append(inv_sqrt_m[:, None] * root)
        return torch.cat(roots)

    def _transform(self, root: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        n_samples, dim = len(z), root.shape[-1]
        w = torch.fft.rfftn(z.reshape(n_samples, *self.supercell, dim), dim=(1, 2, 3), norm="ortho")
        y = torch.einsum("qij,sqj->sqi", root, w.reshape(n_samples, -1, dim)).reshape(w.shape)
        u = torch.fft.irfftn(y, s=self.supercell, dim=(1, 2, 3), norm="ortho")
        return u.reshape(n_samples, self.n_atoms, 3)

    def _msd(self, root: torch.Tensor) -> torch.Tensor:
        r = root.reshape(len(root), -1, 3, root.shape[-1])
        weight = self._tensor(self._q_weight).to(root.dtype)
        return torch.einsum("q,qaik,qajk->aij", weight, r, r.conj()).real / self.n_cells


class _ScatteredPower(torch.autograd.Function):
    """|F(Q)|² (B,), F(Q) = Σ_{l,a} A_a(Q) e^{iQ·x_la}, for q (B, 3) Å⁻¹, x (N_cells, n_unit, 3) Å, A (B, n_unit).

    Chunked over Q and cells (at most `chunk` phases at a time) in forward and backward, which
    recomputes the phases: memory O(B + N) whatever the sizes.
    """

    @staticmethod
    def forward(ctx, q, x, amp, chunk):
        sums = torch.zeros(amp.shape, dtype=q.dtype.to_complex(), device=q.device)  # Σ_l e^{iQ·x_la}
        for qs, cs in _blocks(len(q), x.shape[0], x.shape[1], chunk):
            angle = torch.einsum("bd,cad->bca", q[qs], x[cs])
            sums[qs] += torch.complex(torch.cos(angle).sum(1), torch.sin(angle).sum(1))
        total = (amp * sums).sum(-1)
        ctx.save_for_backward(q, x, amp, sums, total)
        ctx.chunk = chunk
        return total.abs() ** 2

    @staticmethod
    def backward(ctx, grad):
        q, x, amp, sums, total = ctx.saved_tensors
        weight = grad[:, None] * total.conj()[:, None]  # (B, 1)
        grad_x = grad_amp = None
        if ctx.needs_input_grad[2]:
            grad_amp = 2 * (weight * sums).real
        if ctx.needs_input_grad[1]:
            coeff = weight * amp  # ∂|F|²/∂x_la = −2 Q Im(F* A_a e^{iQ·x_la})
            grad_x = torch.zeros_like(x)
            for qs, cs in _blocks(len(q), x.shape[0], x.shape[1], ctx.chunk):
                angle = torch.einsum("bd,cad->bca", q[qs], x[cs])
                c = coeff[qs][:, None, :]
                im = c.imag * torch.cos(angle) + c.real * torch.sin(angle)
                grad_x[cs] -= 2 * torch.einsum("bca,bd->cad", im, q[qs])
        return None, grad_x, grad_amp, None


def _blocks(n_q: int, n_cells: int, n_unit: int, chunk: int):
    """(Q slice, cell slice) pairs covering n_q × n_cells with at most ~`chunk` phases each."""
    step_q = min(n_q, 256)
    step_c = max(1, chunk // (step_q * n_unit))
    for q0 in range(0, n_q, step_q):
        for c0 in range(0, n_cells, step_c):
            yield slice(q0, q0 + step_q), slice(c0, c0 + step_c)
