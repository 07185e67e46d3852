"""Thermal displacement covariance of a harmonic crystal, in q-space and in real space.

C̃_κκ'(q) = Σ_l ⟨u_κ0 u_κ'lᵀ⟩ e^{iq·(r_κ'l − r_κ0)}  (Å², (B, 3n, 3n) complex), docs/theory.md:
- classical: C̃(q) = k_BT · M^{-1/2} D(q)^{-1} M^{-1/2}, by Cholesky (no eigenvectors);
- quantum:   C̃(q) = M^{-1/2} h(D) M^{-1/2}, h(ω²) = (ħω/2)coth(ħω/2k_BT)/ω². Where ħω/2k_BT < 3π/4 for a bound on ω
  (room temperature for most crystals): k_BT·D⁻¹ plus the power series of x·coth x in D, matrix
  products only; otherwise (low T) an eigen-decomposition whose backward uses the Daleckii–Krein
  divided differences. Both are exact at degenerate modes (autograd through torch.linalg.eigh is not:
  −7.8 % at X of fcc Ni).
At q = Γ (any reciprocal-lattice vector) the three mass-weighted rigid translations are removed: a
crystal whose centre of mass is fixed.

`ThermalCovariance` is the one object that chooses among these routes; the forward models (`ase_tds.tds`,
`ase_tds.scattering`) and both samplers (`ase_tds.sampling`) take C̃(q), the self covariance (Debye–Waller) and
the real-space correlation from it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .chunks import map_chunks, matrix_chunk
from .linalg import UnstableError  # noqa: F401 (the package's one instability error, imported from here too)
from .linalg import ChunkConcat, ChunkSum, HermitianInverse, InverseForm, positive_cholesky
from .quantum import HermitianFunction, _quantum_h, quantum_series, quantum_series_form, quantum_series_matrix
from .source import ForceConstantSource
from .structure import reciprocal_vectors, reduced_q
from .units import KB

STATISTICS = ("classical", "quantum")
# THz: a mode more imaginary than this (ν < −UNSTABLE_THZ) makes force constants dynamically unstable; above
# it, an imaginary ν is rounding of an acoustic mode near Γ
UNSTABLE_THZ = 1e-3


def unstable_modes(frequencies) -> np.ndarray:
    """Where frequencies are dynamically unstable modes: ν < −UNSTABLE_THZ (the one stability test).

    Args:
        frequencies (array_like | torch.Tensor): ν, THz (any shape), imaginary modes as negative numbers (as
            `ForceConstantSource.frequencies` gives them).

    Returns:
        bool array of the shape of `frequencies`: True for a mode more imaginary than UNSTABLE_THZ; `.any()`
        says whether the force constants are unstable at these q.
    """
    if isinstance(frequencies, torch.Tensor):
        frequencies = frequencies.detach().cpu().numpy()
    return np.asarray(frequencies, dtype=float) < -UNSTABLE_THZ


def check_statistics(statistics: str) -> None:
    """Refuse statistics other than classical or quantum.

    Args:
        statistics: "classical" or "quantum".

    Raises:
        ValueError: any other value.
    """
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be 'classical' or 'quantum', got {statistics!r}")


def check_temperature(temperature: float, statistics: str | None) -> None:
    """Refuse a temperature that cannot be used: the one temperature rule of ase_tds.

    A model's temperature (ThermalCovariance, and so simulate, fit and export) is finite and ≥ 0 K, with 0 K
    only for quantum statistics: there the displacements are the zero-point motion, while classically they
    vanish and the crystal scatters no diffuse intensity at all. A measurement's temperature (statistics None:
    a data file's attribute, or the temperature given for the data) is finite and > 0 K: no measurement is made
    at 0 K, so a 0 there is a missing value written as a number, not a temperature to model.

    Args:
        temperature: K.
        statistics: "classical" or "quantum" for a model's temperature; None for a measurement's.

    Raises:
        TypeError: a temperature that is not a number.
        ValueError: a negative or non-finite temperature, or 0 K with classical statistics or for a measurement.
    """
    try:
        if isinstance(temperature, (str, bytes)) or np.ndim(temperature) != 0:
            raise TypeError
        float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a number in K, e.g. 300.0; got {temperature!r}") from None
    if not np.isfinite(temperature) or temperature < 0 or (temperature == 0 and statistics != "quantum"):
        allowed = "" if statistics is None else " (≥ 0 K for quantum statistics)"
        raise ValueError(f"temperature must be > 0 K{allowed}, got {temperature!r}")


def translation_projector(masses: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
    """Projector onto the three mass-weighted rigid translations t_κα = √(m_κ/M) e_α.

    Without `phase`: (3n, 3n), the q = 0 (or cell-origin) form. With phase (B, n) = e^{−iG·r_κ}: the
    (B, 3n, 3n) projector onto the zero modes of D(G) in the atomic-position phase convention,
    D(G) = W D(0) W†, W = diag(e^{−iG·r_κ}).

    Args:
        masses: m_κ (n,) amu.
        phase: e^{−iG·r_κ} (B, n) complex; None for the q = 0 (cell-origin) form.

    Returns:
        P, (3n, 3n) real without `phase`, (B, 3n, 3n) complex with it.
    """
    n = masses.numel()
    weight = torch.sqrt(masses / masses.sum())
    mask = torch.eye(3, dtype=masses.dtype, device=masses.device).repeat(n, n)
    if phase is None:
        t = weight.repeat_interleave(3)
        return torch.outer(t, t) * mask
    t = (weight * phase).repeat_interleave(3, dim=-1)
    return t[:, :, None] * t.conj()[:, None, :] * mask


def is_gamma(source, q: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """(B,) bool: q a reciprocal-lattice vector of the primitive cell.

    Args:
        source (ForceConstantSource): the force constants, whose primitive cell is meant.
        q: Cartesian q (B, 3) Å⁻¹.
        tol: the largest distance of each reduced coordinate q·a_i/2π from an integer.

    Returns:
        True (B,) where q is a reciprocal-lattice vector.
    """
    reduced = reduced_q(q, source.primitive.cell[:])
    return (reduced - torch.round(reduced)).abs().amax(dim=-1) < tol


def gamma_lift(dyn: torch.Tensor) -> torch.Tensor:
    """c = |mean diagonal of D| + 1 (eV/Å²/amu): the eigenvalue the three translations get at Γ (any c > 0 gives
    the same covariance; this one keeps D + cP as well conditioned as D), for D (..., m, m).

    Args:
        dyn: D (..., m, m), eV/Å²/amu.

    Returns:
        c, a 0-d real tensor, eV/Å²/amu.
    """
    return torch.diagonal(dyn, dim1=-2, dim2=-1).real.mean().abs() + 1.0


class LiftedDynamicalMatrix(NamedTuple):
    """D(q) with, at Γ points, the three translations lifted to the eigenvalue `lift` (`gamma_lift`).

    Attributes:
        plain: D (B, m, m) complex, eV/Å²/amu.
        lifted: D + c·P (B, m, m) complex, eV/Å²/amu.
        projector: P (B, m, m), the per-q translation projector (zero away from Γ), or None where no q is a
            Γ point.
        lift: c (a 0-d tensor), eV/Å²/amu.
    """

    plain: torch.Tensor
    lifted: torch.Tensor
    projector: torch.Tensor | None
    lift: torch.Tensor


class RealSpaceCovariance(NamedTuple):
    """C_{κ0,κ'l} of a periodic grid of primitive cells (`ThermalCovariance.real_space`).

    G = L1·L2·L3 cells in FFT order, l in [−L/2, L/2) along each axis.

    Attributes:
        separations: r_κ'l − r_κ0, (G, n, n, 3) Å.
        correlation: ⟨u_κ0 u_κ'lᵀ⟩, (G, n, n, 3, 3) Å².
    """

    separations: torch.Tensor
    correlation: torch.Tensor

    def self_covariance(self) -> torch.Tensor:
        """C_{κ0,κ0} (n, 3, 3) Å² of this crystal: its Debye–Waller factor.

        Returns:
            C_{κ0,κ0}, (n, 3, 3) Å², the l = 0 diagonal blocks of `correlation`.
        """
        return torch.stack([self.correlation[0, k, k] for k in range(self.correlation.shape[1])])


class ThermalCovariance:
    """The thermal displacement covariance of a harmonic crystal: one object for every route (docs/theory.md).

    It owns the per-q choice of route (classical: Cholesky; quantum: Cholesky plus the power series of x·coth x
    where it converges, else the eigen-decomposition with the Daleckii–Krein backward), the Γ lift of the three
    translations (removed again: a crystal whose centre of mass is fixed), and the quantum function h(ω²).
    The one-phonon, all-order and sampling models and both samplers take their covariance from it.

    Args:
        source: the force constants, a `ForceConstantSource` (ForceConstantModel or PhonopyForceConstants).
        temperature: K (> 0, or 0 with quantum statistics).
        statistics: "classical" | "quantum" (the default: quantum).

    Raises:
        ValueError: unknown statistics, or a temperature they cannot use.
    """

    def __init__(self, source: ForceConstantSource, temperature: float, statistics: str = "quantum"):
        check_statistics(statistics)
        check_temperature(temperature, statistics)
        self.source = source
        self.temperature = float(temperature)
        self.statistics = statistics

    def __repr__(self) -> str:
        return f"ThermalCovariance({self.source.primitive.get_chemical_formula()}, {self.temperature:g} K, {self.statistics})"

    @property
    def kbt(self) -> float:
        """k_BT in eV."""
        return KB * self.temperature

    def _q(self, q) -> torch.Tensor:
        return torch.as_tensor(q, dtype=self.source.dtype, device=self.source.device).reshape(-1, 3)

    def _series(self) -> np.ndarray | None:
        """The series coefficients b_k where the quantum series converges (`quantum_series`), else None."""
        return quantum_series(self.source, self.temperature) if self.statistics == "quantum" else None

    def lifted(self, q, q_direction=None) -> LiftedDynamicalMatrix:
        """D(q) of the source at Cartesian q (B, 3) Å⁻¹, with the translations lifted at Γ points.

        Args:
            q (array_like | torch.Tensor): Cartesian q (B, 3) Å⁻¹ (reshaped to (-1, 3)).
            q_direction (torch.Tensor | None): (3,), the direction of approach at Γ points, for a source with a
                dipole–dipole term (`has_dipole`); None: its non-analytic part left out there.

        Returns:
            D, D + cP, P and c; D (B, 3n, 3n) complex, eV/Å²/amu.
        """
        q = self._q(q)
        has_dipole = getattr(self.source, "has_dipole", False)
        dyn = self.source.dynamical_matrix(q, q_direction) if has_dipole else self.source.dynamical_matrix(q)
        c = gamma_lift(dyn).detach()  # C̃ does not depend on c: no gradient through it
        gamma = is_gamma(self.source, q)
        if not gamma.any():
            return LiftedDynamicalMatrix(dyn, dyn, None, c)
        pos = torch.as_tensor(self.source.primitive.positions, dtype=q.dtype, device=q.device)
        proj = translation_projector(self.source.masses, torch.exp(-1j * (q @ pos.T))) * gamma[:, None, None]
        return LiftedDynamicalMatrix(dyn, dyn + c * proj, proj, c)

    def _direction_averaged(self, func, q, *per_q) -> torch.Tensor:
        """func(q, *per_q, q_direction) where D(q) is analytic; at the Γ points of a source with a dipole–dipole
        term (its limit depends on the direction of approach), the average over the directions of
        `ase_tds.dipole.GAMMA_DIRECTIONS`: a Γ point of a mesh stands for the cell around it."""
        q = self._q(q)
        if not getattr(self.source, "has_dipole", False):
            return func(q, *per_q, None)
        from .dipole import GAMMA_DIRECTIONS, at_gamma

        gamma = at_gamma(q, self.source.primitive.cell[:])
        if not gamma.any():
            return func(q, *per_q, None)
        pick = torch.nonzero(gamma)[:, 0]
        rest = torch.nonzero(~gamma)[:, 0]
        directions, weights = (torch.as_tensor(x, dtype=q.dtype, device=q.device) for x in GAMMA_DIRECTIONS)
        at = sum(w * func(q[pick], *(x[pick] for x in per_q), d) for d, w in zip(directions, weights))
        out = torch.zeros((len(q), *at.shape[1:]), dtype=at.dtype, device=at.device).index_put((pick,), at)
        if len(rest):
            out = out.index_put((rest,), func(q[rest], *(x[rest] for x in per_q), None))
        return out

    def mass_weighted(self, q) -> torch.Tensor:
        """M^{1/2} C̃(q) M^{1/2} (B, 3n, 3n) complex, Å²·amu: k_BT·D⁻¹ (classical) or h(D) (quantum); at Γ points of
        a source with a dipole–dipole term, averaged over the directions of approach.

        Args:
            q (array_like | torch.Tensor): Cartesian q (B, 3) Å⁻¹ (reshaped to (-1, 3)).

        Returns:
            M^{1/2} C̃(q) M^{1/2}, (B, 3n, 3n) complex, Å²·amu.

        Raises:
            UnstableError: D(q) is not positive definite (beyond the translations at Γ) at some q.
        """
        return self._direction_averaged(self._mass_weighted, q)

    def _mass_weighted(self, q, q_direction) -> torch.Tensor:
        d = self.lifted(q, q_direction)
        series = self._series()
        if self.statistics == "quantum" and series is None:
            func = _quantum_h(self.temperature)
            cov = HermitianFunction.apply(d.lifted, func)
            h_c = func(d.lift.reshape(1).to(d.lifted.real.dtype))[0][0]
            return cov if d.projector is None else cov - h_c * d.projector
        cov = self.kbt * HermitianInverse.apply(d.lifted, "q")
        if d.projector is not None:
            cov = cov - self.kbt / d.lift * d.projector
        return cov if series is None else cov + quantum_series_matrix(d.plain, series, d.projector)

    def __call__(self, q) -> torch.Tensor:
        """C̃(q) (B, 3n, 3n) complex in Å² at Cartesian q (B, 3) Å⁻¹ (phase convention of docs/theory.md).

        Args:
            q (array_like | torch.Tensor): Cartesian q (B, 3) Å⁻¹ (reshaped to (-1, 3)).

        Returns:
            C̃(q), (B, 3n, 3n) complex, Å².

        Raises:
            UnstableError: D(q) is not positive definite (beyond the translations at Γ) at some q.
        """
        inv_sqrt_m = (1.0 / torch.sqrt(self.source.masses)).repeat_interleave(3)
        cov = self.mass_weighted(q)
        return cov * (inv_sqrt_m[:, None] * inv_sqrt_m[None, :]).to(cov.dtype)

    def mass_weighted_form(self, q, v: torch.Tensor) -> torch.Tensor:
        """v†(M^{1/2} C̃(q) M^{1/2})v (B,) real, Å²·amu·|v|², for real v (B, 3n): the one-phonon intensity's form.

        Classical: k_BT ‖L⁻¹v‖² with D = LL† (one triangular solve per q); quantum: the same plus the series
        (matrix–vector products), or where it does not converge the full matrix function.

        Args:
            q (array_like | torch.Tensor): Cartesian q (B, 3) Å⁻¹ (reshaped to (-1, 3)).
            v: real (B, 3n).

        Returns:
            v†(M^{1/2} C̃(q) M^{1/2})v, (B,) real, Å²·amu·|v|².

        Raises:
            UnstableError: D(q) is not positive definite (beyond the translations at Γ) at some q.
        """
        return self._direction_averaged(self._mass_weighted_form, q, v)

    def _mass_weighted_form(self, q, v: torch.Tensor, q_direction) -> torch.Tensor:
        if self.statistics == "quantum" and self._series() is None:  # the eigen route
            cov = self._mass_weighted(q, q_direction)
            vc = v.to(cov.dtype)
            return torch.einsum("bi,bij,bj->b", vc.conj(), cov, vc).real
        d = self.lifted(q, q_direction)
        value = self.kbt * InverseForm.apply(d.lifted, v, "Q")
        if d.projector is not None:  # the lifted translations: subtract k_BT/c · v†Pv
            vc = v.to(d.projector.dtype)
            value = value - self.kbt / d.lift * torch.einsum("bi,bij,bj->b", vc.conj(), d.projector, vc).real
        series = self._series()
        return value if series is None else value + quantum_series_form(d.plain, v, series, d.projector)

    def square_root(self, lifted: torch.Tensor, projector: torch.Tensor | None) -> torch.Tensor:
        """S (B, m, m) with S S† = M^{1/2} C̃ M^{1/2}, the translations removed: √(k_BT) L⁻† for D + cP = LL†
        (classical) or the Cholesky factor of h(D + cP) (quantum), then (1 − P) S.

        For the q-space sampler.

        Args:
            lifted: D + cP (B, m, m) complex, eV/Å²/amu, in any phase convention (the samplers' cell-origin one).
            projector: P (B, m, m) (zero away from Γ), or None where no q is a Γ point.

        Returns:
            S (B, m, m) complex, Å·√amu.

        Raises:
            UnstableError: D + cP is not positive definite at some q (classical statistics; quantum: at an
                eigenvalue ≤ 0).
        """
        if self.statistics == "classical":
            chol = positive_cholesky(lifted, "commensurate q of the supercell")
            eye = torch.eye(lifted.shape[-1], dtype=lifted.dtype, device=lifted.device)
            root = np.sqrt(self.kbt) * torch.linalg.solve_triangular(chol, eye, upper=False).mH
        else:
            root = torch.linalg.cholesky(HermitianFunction.apply(lifted, _quantum_h(self.temperature)))
        return root if projector is None else root - projector.to(root.dtype) @ root

    def mean_square_displacement(self, mesh=(16, 16, 16), chunk: int | None = None) -> torch.Tensor:
        """C_{κ0,κ0} (n, 3, 3) Å²: the Brillouin-zone average of C̃_κκ(q) on a Γ-centred `mesh`.

        The Γ point contributes its optical modes only; the missing long-wave part falls as 1/mesh
        (`converged_mean_square_displacement` extrapolates it away).

        Args:
            mesh (tuple[int, int, int]): (n1, n2, n3) points along the primitive reciprocal axes.
            chunk: q per block of the parallel evaluation (`map_chunks`); None: `matrix_chunk`'s size.

        Returns:
            C_{κ0,κ0}, (n, 3, 3) Å².

        Raises:
            UnstableError: D(q) is not positive definite at some q of the mesh.
        """
        q = mesh_q(self.source, mesh)
        n = self.source.n_atoms
        # no graph in the forward; the backward (if θ needs one) recomputes the chunks' graphs one at a time
        total = ChunkSum.apply(self.source.theta, self.source, lambda qc: self(qc).sum(dim=0).real, q,
                               chunk or matrix_chunk(n, 4096))
        blocks = (total / len(q)).reshape(n, 3, n, 3)
        return torch.stack([blocks[k, :, k, :] for k in range(n)])

    def converged_mean_square_displacement(self, mesh: int = 12) -> torch.Tensor:
        """C_{κ0,κ0} (n, 3, 3) Å², Richardson-extrapolated from Γ-centred meshes `mesh`³ and (2·`mesh`)³.

        The error of one mesh falls as 1/mesh (the missing long waves); for EMT Ni at 300 K meshes 12/24
        give 5e-4 relative to the 24/48 value.

        Args:
            mesh: points per axis of the coarse mesh (the fine one has twice as many).

        Returns:
            C_{κ0,κ0}, (n, 3, 3) Å².

        Raises:
            UnstableError: D(q) is not positive definite at some q of the meshes.
        """
        coarse = self.mean_square_displacement((mesh,) * 3)
        fine = self.mean_square_displacement((2 * mesh,) * 3)
        return 2 * fine - coarse

    def real_space(self, grid=(15, 15, 15), chunk: int | None = None, recompute: bool = False) -> RealSpaceCovariance:
        """C_{κ0,κ'l} on a periodic grid of L1×L2×L3 primitive cells, by FFT of C̃(q) on the commensurate q mesh.

        The exact covariance of a periodic L1×L2×L3 crystal with its centre of mass fixed; l in [−L/2, L/2)
        along each axis (odd L avoid the ambiguous half-way plane).

        Args:
            grid (tuple[int, int, int]): (L1, L2, L3) primitive cells of the periodic crystal.
            chunk: q per block of the parallel evaluation (`map_chunks`); None: `matrix_chunk`'s size.
            recompute: keep no graph of C̃ but recompute it a chunk at a time in the backward (`ChunkConcat`):
                memory of one chunk, for crystals of 10⁵–10⁶ cells (the fft model's).

        Returns:
            The separations (G, n, n, 3) Å and correlation C_{κ0,κ'l} (G, n, n, 3, 3) Å², G = L1·L2·L3.

        Raises:
            UnstableError: D(q) is not positive definite at some q of the commensurate mesh.
        """
        grid = tuple(int(x) for x in grid)
        source = self.source
        q = mesh_q(source, grid)
        n = source.n_atoms
        pos = torch.as_tensor(source.primitive.positions, dtype=q.dtype, device=q.device)

        def origin_convention(qc):
            cov = self(qc).reshape(-1, n, 3, n, 3)
            # to the cell-origin phase convention: × e^{−iq·(r_κ' − r_κ)}
            shift = torch.exp(-1j * (qc @ pos.T))  # (b, n): e^{−iq·r_κ}
            return cov * shift.conj()[:, :, None, None, None] * shift[:, None, None, :, None]

        chunk = chunk or matrix_chunk(n, 4096)
        cov = (ChunkConcat.apply(source.theta, source, origin_convention, q, chunk) if recompute
               else torch.cat(map_chunks(origin_convention, (q,), chunk))).reshape(*grid, n, 3, n, 3)
        corr = torch.fft.fftn(cov, dim=(0, 1, 2)).real / len(q)
        index = np.stack(np.meshgrid(*[np.arange(m) for m in grid], indexing="ij"), -1).reshape(-1, 3)
        index = index - np.array(grid) * (index >= (np.array(grid) + 1) // 2)
        cell = np.array(source.primitive.cell[:])
        lattice = torch.as_tensor(index @ cell, dtype=q.dtype, device=q.device)
        separations = lattice[:, None, None, :] + pos[None, None, :, :] - pos[None, :, None, :]
        correlation = corr.reshape(-1, n, 3, n, 3).permute(0, 1, 3, 2, 4)
        return RealSpaceCovariance(separations, correlation)


def reduced_grid(mesh, shift: bool = False) -> np.ndarray:
    """Points (N, 3) of an n1×n2×n3 mesh in reduced coordinates, Γ-centred or shifted by half a step.

    Args:
        mesh (array_like): (n1, n2, n3).
        shift: shift every point by half a step along each axis (False: Γ-centred).

    Returns:
        Reduced coordinates (N, 3) in [0, 1), N = n1·n2·n3, C order over the three axes.
    """
    mesh = np.asarray(mesh, dtype=int)
    axes = [(np.arange(m) + (0.5 if shift else 0.0)) / m for m in mesh]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def mesh_q(model, mesh, shift: bool = False) -> torch.Tensor:
    """Cartesian q (N, 3) Å⁻¹ of a mesh in the primitive reciprocal cell.

    Args:
        model (ForceConstantSource): the force constants, whose primitive cell, dtype and device are used.
        mesh (array_like): (n1, n2, n3).
        shift: shift every point by half a step along each axis (False: Γ-centred).

    Returns:
        Cartesian q (N, 3) Å⁻¹, N = n1·n2·n3, in the model's dtype and on its device.
    """
    q = reduced_grid(mesh, shift) @ reciprocal_vectors(model.primitive.cell[:])
    return torch.as_tensor(q, dtype=model.dtype, device=model.device)


def lowest_frequency(model, mesh=(6, 6, 6)) -> float:
    """The lowest phonon frequency (THz, imaginary as negative) of `model` on a Γ-centred q mesh, Γ left out.

    `unstable_modes(lowest_frequency(model))` says whether the force constants are unstable on that mesh.

    Args:
        model (ForceConstantSource): anything with `frequencies(q)` and a primitive cell.
        mesh (tuple[int, int, int]): (3,) q points per reciprocal axis of the primitive cell.

    Returns:
        The lowest frequency, THz; negative for an imaginary mode.
    """
    return float(model.frequencies(mesh_q(model, mesh)[1:]).min())
