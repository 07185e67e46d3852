"""ForceConstantModel: θ (trainable, eV/Å²) → force constants Φ → dynamical matrix D(q).

One object owns a crystal's harmonic state, like phonopy's `Phonopy`: the structure it was built from
(`unitcell`, e.g. a conventional cell), its primitive cell in the same Cartesian frame, and a
symmetry-adapted basis. Everything from θ on is a differentiable torch graph on any device.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from ase import Atoms
from ase.geometry import find_mic
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from .basis import build_basis
from .born import BornParameters, unit_of
from .dynamical import assemble_dynamical_matrix, fold_pairs, group_by_block, row_sum_bound
from .phonopy_load import load_phonopy, short_range_force_constants
from .covariance import mesh_q, unstable_modes
from .source import SourceTensors
from .structure import (
    StructureError,
    check_periodic,
    cutoff_for_shells,
    diagonal_supercell_for,
    find_primitive,
    holds_cutoff,
    pair_distances,
    reciprocal_q,
    shortest_lattice_vector,
    to_ase_atoms,
    to_phonopy_atoms,
)
from .units import HBAR_OMEGA_UNIT, KB, THZ_PER_SQRT_EV_A2_AMU

# eV/Å²: force constants below this are rounding noise of a file (phonopy writes 15 decimals)
NEGLIGIBLE = 1e-8


class ForceConstantModel(BornParameters, SourceTensors, torch.nn.Module):
    """Symmetry-reduced harmonic force constants of a crystal, with θ the only trainable parameter.

    ForceConstantModel(atoms, shells=5) or ForceConstantModel(atoms, cutoff=5.8): `atoms` is any
    periodic ase.Atoms (a conventional cell is fine); the primitive cell is found with spglib.
    θ (n_params,) in eV/Å², labelled in `labels` (Born–von Kármán style: θ = −Φ of one element).
    θ starts at zero: set it with one of the `set_from_*` methods or `set_parameters`.

    Args:
        atoms: periodic ase.Atoms of the crystal (kept as `unitcell`).
        shells: number of neighbour shells within the cutoff; give this or `cutoff`.
        cutoff: pair cutoff, Å, between two neighbour shells; give this or `shells`.
        symprec: symmetry tolerance, Å (spglib's and symfc's).
        dtype: torch dtype of θ and of everything computed from it.

    Raises:
        StructureError: a non-periodic structure, both or neither of shells and cutoff, or a bad cutoff.
    """

    def __init__(self, atoms: Atoms, shells: int | None = None, cutoff: float | None = None,
                 symprec: float = 1e-5, dtype: torch.dtype = torch.float64):
        super().__init__()
        check_periodic(atoms)
        if (shells is None) == (cutoff is None):
            raise StructureError("give exactly one of shells=N or cutoff=Å (e.g. ForceConstantModel(atoms, shells=5))")
        self.unitcell = atoms.copy()
        self.unitcell.calc = None
        self.primitive, self.primitive_matrix = find_primitive(atoms, symprec=symprec)
        if shells is not None:
            cutoff = cutoff_for_shells(self.primitive, shells)
        self.cutoff = float(cutoff)
        self.symprec = symprec
        self.far = None  # fixed force constants past the cutoff (PhonopyForceConstants), added to D(q): `set_far`
        self.basis = build_basis(self.primitive, self.cutoff, symprec=symprec)
        self.labels = list(self.basis.labels)
        self.born_basis = None  # the basis of fitted Born charges and ε∞ (`set_born(fit=True)`), else None

        self.theta = torch.nn.Parameter(torch.zeros(self.basis.n_params, dtype=dtype))
        masses = self.primitive.get_masses()
        self.register_buffer("masses", torch.tensor(masses, dtype=dtype))
        # Φ = Σ_k θ_k T_k from the non-zero entries of T (k, P·9) only (under 1 % of them for low symmetry)
        tensors = self.basis.tensors.reshape(self.basis.n_params, 9 * len(self.basis.atom0))
        param, entry = np.nonzero(tensors)
        self.register_buffer("tensor_param", torch.tensor(param))
        self.register_buffer("tensor_entry", torch.tensor(entry))
        self.register_buffer("tensor_value", torch.tensor(tensors[param, entry], dtype=dtype))
        # D(q) assembly: pairs grouped by atom block κ·n + κ', padded with zero-weight pairs
        n = len(self.primitive)
        slots, filled = group_by_block(self.basis.atom0 * n + self.basis.atom1, n)
        inv_sqrt_m = filled / np.sqrt(masses[self.basis.atom0[slots]] * masses[self.basis.atom1[slots]])
        self.register_buffer("block_pairs", torch.tensor(slots))
        self.register_buffer("block_vectors", torch.tensor(self.basis.vectors[slots] * filled[..., None], dtype=dtype))
        self.register_buffer("block_inv_sqrt_mass", torch.tensor(inv_sqrt_m, dtype=dtype))

    # ------------------------------------------------------------------ basic views
    @property
    def n_atoms(self) -> int:
        """Atoms in the primitive cell."""
        return len(self.primitive)

    @property
    def n_params(self) -> int:
        """Number of parameters: the length of θ (n_params,)."""
        return self.theta.numel()

    def __repr__(self) -> str:
        return (f"ForceConstantModel({self.primitive.get_chemical_formula()}, cutoff={self.cutoff:.3f} Å, "
                f"{self.n_params} parameters)")

    def parameter_dict(self) -> dict[str, float]:
        """{label: value in eV/Å²}.

        Returns:
            dict from each label in `labels` to its θ (float, eV/Å²), in the order of θ.
        """
        return dict(zip(self.labels, self.theta.detach().cpu().tolist()))

    def table(self, uncertainties=None) -> str:
        """Plain-text table of label, value (eV/Å²) and unit, and 1σ when `uncertainties` (n_params,) are given.

        Args:
            uncertainties (array_like | None): 1σ (n_params,) eV/Å² in the order of θ; None = no 1σ column.

        Returns:
            The table, one line per parameter after a header line.
        """
        lines = [f"{'label':<14}{'value':>12}  unit" + ("         1σ" if uncertainties is not None else "")]
        for i, (label, value) in enumerate(self.parameter_dict().items()):
            line = f"{label:<14}{value:>12.5f}  {unit_of(label):<5}"
            if uncertainties is not None:
                line += f"  {float(uncertainties[i]):>9.5f}"
            lines.append(line)
        return "\n".join(lines)

    # ------------------------------------------------------------------ θ → Φ → D(q)
    def pair_force_constants(self) -> torch.Tensor:
        """Φ(κ0; κ'l') per pair of the basis, (P, 3, 3) eV/Å².

        Returns:
            Φ (P, 3, 3) eV/Å², differentiable in θ; pairs as in `basis`.
        """
        flat = torch.zeros(9 * len(self.basis.atom0), dtype=self.dtype, device=self.device)
        flat = flat.index_add(0, self.tensor_entry, self.theta[self.tensor_param] * self.tensor_value)
        return flat.reshape(-1, 3, 3)

    def dynamical_matrix(self, q, q_direction=None) -> torch.Tensor:
        """D(q) (B, 3n, 3n) complex, eV/Å²/amu, for Cartesian q (B, 3) in Å⁻¹ (phases from atomic positions): the
        force constants', plus the dipole–dipole term where the crystal has Born charges (`set_born`).

        Args:
            q (array_like | torch.Tensor): Cartesian q (B, 3) Å⁻¹ (array or tensor; reshaped to (B, 3)).
            q_direction (array_like | torch.Tensor | None): (B, 3) or (3,), the direction of approach at Γ points
                (the non-analytic term); None: left out there.

        Returns:
            D(q) (B, 3n, 3n) complex eV/Å²/amu, n = `n_atoms`, differentiable in θ.
        """
        q = torch.as_tensor(q, dtype=self.dtype, device=self.device).reshape(-1, 3)
        angle = torch.einsum("ba,kma->bkm", q, self.block_vectors)
        dyn = assemble_dynamical_matrix(angle, self.block_weighted, self.n_atoms)
        if self.far is not None:
            dyn = dyn + self.far.dynamical_matrix(q)
        return dyn if self.born is None else dyn + self.dipole_matrix(q, q_direction)

    def set_far(self, far) -> "ForceConstantModel":
        """Add fixed force constants past θ's cutoff to D(q) (None: remove them); returns the model.

        `refine` holds a potential's force constants beyond the refined range at its start's this way
        (docs/refine.md, "Range"). Routes that need force constants in real space (phonopy files, samplers,
        TDSFitted) take θ's alone and refuse a model that has them (`short_range_only`).

        Args:
            far (PhonopyForceConstants | None): without Born charges, of this crystal's primitive cell.
        """
        if far is not None:
            same = len(far.primitive) == self.n_atoms and np.allclose(far.primitive.cell[:], self.primitive.cell[:])
            if same:
                shift = far.primitive.get_scaled_positions() - self.primitive.get_scaled_positions()
                same = np.allclose(shift - np.round(shift), 0.0, atol=1e-6)
            if far.born is not None or not same:
                raise ValueError("far force constants are short ranged (no Born charges) and of this model's "
                                 "primitive cell, its atoms in its order")
        self.far = None if far is None else far.to(self.dtype).to(self.device)
        return self

    def short_range_only(self, what: str) -> None:
        """Raise ValueError where the model has fixed force constants past its cutoff (`set_far`) that `what`, a
        real-space route, cannot hold."""
        if self.far is not None:
            raise ValueError(f"{what} takes the force constants θ holds, within {self.cutoff:.3f} Å; this model adds "
                             "fixed ones past that (set_far): remove them with set_far(None) first")

    @property
    def block_weighted(self) -> torch.Tensor:
        """Φ/√(m_κ m_κ') of the pairs grouped by atom block, (n², m, 3, 3) eV/Å²/amu, zero for padding."""
        return self.pair_force_constants()[self.block_pairs] * self.block_inv_sqrt_mass[..., None, None]

    def eigenvalue_bound(self) -> float:
        """An upper bound (eV/Å²/amu) on the eigenvalues of D(q) at every q (see `row_sum_bound`).

        Returns:
            The bound, eV/Å²/amu.
        """
        far = 0.0 if self.far is None else self.far.eigenvalue_bound()
        return row_sum_bound(self.block_weighted, self.n_atoms) + self.dipole_bound() + far

    def frequencies(self, q) -> np.ndarray:
        """Phonon frequencies (B, 3n) in THz at Cartesian q (B, 3) Å⁻¹; imaginary modes as negative numbers.

        Args:
            q (array_like | torch.Tensor): Cartesian q (B, 3) Å⁻¹.

        Returns:
            ν (B, 3n) THz, ascending per q (not differentiable).
        """
        with torch.no_grad():
            eig = torch.linalg.eigvalsh(self.dynamical_matrix(q)).cpu().numpy()
        return np.sign(eig) * np.sqrt(np.abs(eig)) * THZ_PER_SQRT_EV_A2_AMU

    def q_from_hkl(self, hkl, cell=None) -> np.ndarray:
        """Cartesian q (N, 3) Å⁻¹ from hkl (N, 3) in r.l.u. of `cell` (3, 3) Å (default: the model's unit cell).

        Args:
            hkl (array_like): (N, 3) r.l.u. of `cell`.
            cell (array_like | None): lattice vectors (3, 3) Å as rows; None = the model's `unitcell`.

        Returns:
            q (N, 3) Å⁻¹, Cartesian.
        """
        return reciprocal_q(hkl, self.unitcell.cell[:] if cell is None else cell)

    # ------------------------------------------------------------------ phonopy layouts
    def supercell_columns(self, positions, cell, rows) -> tuple[np.ndarray, np.ndarray]:
        """Where each pair lands in a supercell: for row r and pair p, the column atom index.

        positions (N, 3) Å and cell (3, 3) of a supercell of this crystal (any atom order); rows: the
        supercell atoms whose force-constant rows are wanted. Returns (entries (M, 3): row position,
        pair, column atom).

        Args:
            positions (array_like): Cartesian positions (N, 3) Å of the supercell's atoms.
            cell (array_like): the supercell's lattice vectors (3, 3) Å as rows.
            rows (array_like): indices (R,) of the supercell atoms whose rows are wanted.

        Returns:
            entries (M, 3) int: (index into `rows`, pair of the basis, column atom of the supercell).

        Raises:
            StructureError: an atom on no lattice site, or a neighbour that falls on no atom.
        """
        positions = np.asarray(positions, dtype=float)
        cell = np.asarray(cell, dtype=float)
        kappa = self.site_of(positions)
        frac = (positions @ np.linalg.inv(cell)) % 1.0
        tree = cKDTree(frac % 1.0, boxsize=1.0)
        entries = []
        for r, atom in enumerate(rows):
            pairs = np.nonzero(self.basis.atom0 == kappa[atom])[0]
            target = ((positions[atom] + self.basis.vectors[pairs]) @ np.linalg.inv(cell)) % 1.0
            dist, col = tree.query(target % 1.0)
            if np.any(dist > 1e-4):
                raise StructureError("the supercell is not a supercell of the model's crystal "
                                     "(a neighbour falls on no atom); check its cell and orientation")
            entries.append(np.stack([np.full(len(pairs), r), pairs, col], axis=1))
        return np.concatenate(entries)

    def site_of(self, positions, tol: float = 1e-3) -> np.ndarray:
        """Primitive-cell atom κ (N,) of each Cartesian position (N, 3), by lattice translation.

        Args:
            positions (array_like): Cartesian positions (N, 3) Å in the model's frame.
            tol: Å, the largest distance from a lattice site.

        Returns:
            κ (N,) int, the nearest site's primitive-cell atom.

        Raises:
            StructureError: a position farther than `tol` from every lattice site.
        """
        prim_cell = np.array(self.primitive.cell[:])
        frac = np.asarray(positions) @ np.linalg.inv(prim_cell)
        ref = self.primitive.get_scaled_positions()
        diff = frac[:, None, :] - ref[None, :, :]
        diff -= np.round(diff)
        dist = np.linalg.norm(diff @ prim_cell, axis=-1)
        kappa = np.argmin(dist, axis=1)
        if np.any(dist[np.arange(len(kappa)), kappa] > tol):
            bad = int(np.argmax(dist.min(axis=1)))
            raise StructureError(f"atom {bad} at {np.round(positions[bad], 4).tolist()} Å sits on no lattice site "
                                 f"of the model's crystal (tolerance {tol} Å)")
        return kappa

    def force_constants(self, supercell, layout: str = "compact") -> torch.Tensor:
        """Φ on a phonopy supercell: compact (n_p, N, 3, 3) or full (N, N, 3, 3) eV/Å², differentiable.

        `supercell`: a phonopy.Phonopy object (its supercell and primitive are used). The supercell must
        hold the cutoff (every pair a unique minimum image).

        Args:
            supercell (phonopy.Phonopy): phonopy.Phonopy of this crystal; its supercell has N atoms, its primitive n_p.
            layout: "compact" (rows of the primitive atoms, phonopy's p2s_map) | "full" (all N rows).

        Returns:
            Φ (n_p, N, 3, 3) or (N, N, 3, 3) eV/Å², differentiable in θ.

        Raises:
            StructureError: a supercell too small for the cutoff, or not of this crystal.
            ValueError: an unknown layout.
        """
        self.short_range_only("force_constants (and to_phonopy)")
        sc = supercell.supercell
        if not holds_cutoff(sc.cell, self.cutoff):
            raise StructureError(f"the supercell is too small for the cutoff {self.cutoff:.3f} Å: its shortest "
                                 f"translation must exceed {2 * self.cutoff:.3f} Å; use a larger supercell_matrix")
        rows = supercell.primitive.p2s_map if layout == "compact" else np.arange(len(sc))
        if layout not in ("compact", "full"):
            raise ValueError(f"layout must be 'compact' or 'full', got {layout!r}")
        short = self._fold(self.pair_force_constants(), sc.positions, sc.cell, rows)
        if self.born is None:
            return short
        from .dipole import dipole_force_constants

        return short + dipole_force_constants(supercell, self.primitive, self.born_charges(), layout)

    def _fold(self, pair_fc: torch.Tensor, positions, cell, rows) -> torch.Tensor:
        """Sum per-pair blocks (P, 3, 3) into an array (len(rows), N, 3, 3) on a supercell."""
        return fold_pairs(pair_fc, self.supercell_columns(positions, cell, rows), len(rows), len(positions))

    def to_phonopy(self, supercell_matrix):
        """A phonopy.Phonopy with this model's force constants (compact, eV/Å²) on `supercell_matrix` (3, 3) × unitcell.

        Args:
            supercell_matrix (array_like): (3, 3) int (or (3,) diagonal) relative to `unitcell`; it must hold the
                cutoff.

        Returns:
            (phonopy.Phonopy): with `force_constants` (n_p, N, 3, 3) eV/Å² set.

        Raises:
            StructureError: a supercell too small for the cutoff.
        """
        from phonopy import Phonopy

        ph = Phonopy(to_phonopy_atoms(self.unitcell), supercell_matrix=np.asarray(supercell_matrix),
                     primitive_matrix=self.primitive_matrix, symprec=self.symprec)
        with torch.no_grad():
            ph.force_constants = self.force_constants(ph, "compact").cpu().numpy()
            if self.born is not None:
                ph.nac_params = self.born_charges().nac_params(self.primitive, ph)
        return ph

    # ------------------------------------------------------------------ initial values
    @torch.no_grad()
    def set_parameters(self, theta) -> "ForceConstantModel":
        """Set θ (n_params,) eV/Å² in place; returns the model.

        Args:
            theta (array_like): θ (n_params,) eV/Å², in the order of `labels`.

        Returns:
            The model itself.

        Raises:
            ValueError: θ of another shape, or not finite.
        """
        try:
            theta = torch.as_tensor(np.asarray(theta, dtype=float))
        except (TypeError, ValueError):
            raise TypeError(f"theta must be {self.n_params} numbers (eV/Å², in the order {', '.join(self.labels)}); "
                            f"got {type(theta).__name__}") from None
        if theta.shape != self.theta.shape:
            raise ValueError(f"expected {self.n_params} parameters ({', '.join(self.labels)}), got shape {tuple(theta.shape)}")
        if not torch.isfinite(theta).all():
            bad = [label for label, value in zip(self.labels, theta.tolist()) if not np.isfinite(value)]
            raise ValueError(f"force constants must be finite numbers (eV/Å²); {', '.join(bad)} are not")
        self.theta.copy_(theta)
        return self

    def set_force_constants(self, values) -> "ForceConstantModel":
        """Set the force-constant part of θ (the first `basis.n_params`, eV/Å²), leaving fitted Born parameters.

        Args:
            values (array_like): (basis.n_params,) eV/Å², in the order of `basis.labels`.

        Returns:
            The model itself.
        """
        theta = self.theta.detach().cpu().numpy().copy()
        theta[:self.basis.n_params] = np.asarray(values, dtype=float)
        return self.set_parameters(theta)

    def set_from_bvk(self, constants: dict) -> "ForceConstantModel":
        """Set θ from a {label: value eV/Å²} dict (labels as in `self.labels`; missing ones become 0).

        Args:
            constants: {label: value eV/Å²}, e.g. {"1XX": 1.2, "1ZZ": -0.3} (Born–von Kármán θ = −Φ).

        Returns:
            The model itself.

        Raises:
            KeyError: a label the model does not have.
        """
        unknown = sorted(set(constants) - set(self.basis.labels))
        if unknown:
            raise KeyError(f"unknown force-constant label(s) {unknown}; this model's labels are {self.basis.labels}")
        return self.set_force_constants([float(constants.get(label, 0.0)) for label in self.basis.labels])

    @classmethod
    def from_phonopy(cls, source) -> ForceConstantModel:
        """The ForceConstantModel of phonopy force constants: the one way from a phonopy file to a model.

        The cutoff takes in every neighbour shell with a force-constant element above NEGLIGIBLE, but stays below
        half the shortest translation of phonopy's supercell; the force constants are projected onto that model's
        basis (`set_from_phonopy`). Exact for files written by ase_tds (their supercells are larger than their
        cutoff needs); otherwise the pairs at and beyond half the supercell are dropped. To use phonopy's force
        constants exactly as they are (every pair, no symmetry basis), use `PhonopyForceConstants`.

        Args:
            source (phonopy.Phonopy | str | Path): phonopy.Phonopy with force constants, a phonopy.load-able file,
                or a folder holding phonopy_params.yaml.

        Returns:
            ForceConstantModel of phonopy's unit cell, θ (n_params,) eV/Å² projected from phonopy's Φ.

        Raises:
            TypeError: `source` holds no force constants.
            StructureError: no force constant above NEGLIGIBLE (1e-8 eV/Å²) within half the shortest
                translation of phonopy's supercell.
        """
        if isinstance(source, (str, os.PathLike)):
            source = load_phonopy(source)
        if getattr(source, "force_constants", None) is None:
            raise TypeError("expected a ForceConstantModel, a folder holding phonopy_params.yaml, a phonopy file or a phonopy.Phonopy "
                            f"with force constants; got {type(source).__name__} without them")
        fc, cell = np.asarray(source.force_constants), source.supercell.cell
        rows = source.primitive.p2s_map if fc.shape[0] != fc.shape[1] else np.arange(fc.shape[0])
        positions = source.supercell.positions
        _, distances = find_mic((positions[None, :] - positions[rows][:, None]).reshape(-1, 3), cell)
        reach = distances[np.abs(fc).max(axis=(2, 3)).ravel() > NEGLIGIBLE].max(initial=0.0)

        unitcell = to_ase_atoms(source.unitcell)
        half = 0.5 * shortest_lattice_vector(cell)
        radii = pair_distances(find_primitive(unitcell)[0], half + 1.0)
        kept = radii[(radii < half - 1e-3) & (radii < reach + 1e-3)]
        if len(kept) == 0:
            raise StructureError(f"no force constants to use: none above {NEGLIGIBLE} eV/Å² within half the "
                                 f"shortest translation ({half:.3f} Å) of phonopy's supercell")
        cutoff = 0.5 * (kept[-1] + np.append(radii[len(kept):], half).min())
        return cls(unitcell, cutoff=cutoff).set_from_phonopy(source)

    def set_from_phonopy(self, phonopy_or_path) -> "ForceConstantModel":
        """Least-squares projection of phonopy force constants (a Phonopy object or a phonopy.load-able file).

        Args:
            phonopy_or_path (phonopy.Phonopy | str | Path): phonopy.Phonopy with force constants, a phonopy.load-able
                yaml, or a folder holding phonopy_params.yaml (see `load_phonopy`).

        Returns:
            The model itself, θ (n_params,) eV/Å² the least-squares fit to phonopy's Φ.

        Raises:
            StructureError: other species on the sites, or a supercell too small to determine every θ.
            FileNotFoundError: no such file.
            ValueError: an unreadable file, or one without force constants.
        """
        ph = load_phonopy(phonopy_or_path)
        fc = short_range_force_constants(ph, self.primitive)  # split with the file's own charges
        if ph.nac_params is not None and (self.born is None or self.born_basis is not None):
            from .dipole import BornCharges

            # the file's charges: a model's own where it has none, and the start of fitted ones (with the short range
            # split by them, the file's model is the start, not its short range beside other charges)
            self.set_born(BornCharges.from_phonopy_born(ph, self.primitive), fit=self.born_basis is not None)
        sc = ph.supercell
        rows = ph.primitive.p2s_map if fc.shape[0] != fc.shape[1] else np.arange(len(sc))
        self._check_species(sc)
        design = self._fold(torch.as_tensor(self.basis.tensors).permute(1, 2, 3, 0), sc.positions, sc.cell, rows)
        design = design.reshape(-1, self.basis.n_params).numpy()
        if np.linalg.matrix_rank(design) < self.basis.n_params:
            raise StructureError("the phonopy supercell is too small to determine all force constants of "
                                 f"this model (cutoff {self.cutoff:.3f} Å); use force constants from a larger supercell")
        return self.set_force_constants(np.linalg.lstsq(design, fc.reshape(-1), rcond=None)[0])

    def set_from_springs(self, debye_temperature: float = 300.0, decay: float = 0.5) -> "ForceConstantModel":
        """A generic start for any crystal: central springs between every pair within the cutoff.

        Φ(κ0; κ'l) = −k(r) r̂r̂ᵀ with k(r) = k₀ exp(−(r − r₁)/(decay·r₁)), r₁ the shortest pair, the on-site blocks
        from the sum rule: symmetric under every isometry, so exact in the basis. k₀ sets the Debye temperature
        (K) of the result, from the Debye model's ⟨ω²⟩ = (3/5) ω_D² over the zone (mesh 8³). Raises
        StructureError where springs within the cutoff leave the crystal unstable (raise the cutoff).

        Args:
            debye_temperature: K (> 0), the Debye temperature the springs are scaled to.
            decay: fall-off length of k(r), in units of the shortest pair distance r₁.

        Returns:
            The model itself.

        Raises:
            ValueError: a Debye temperature that is not positive.
            StructureError: springs within the cutoff leave the crystal unstable.
        """
        if not (np.isfinite(debye_temperature) and debye_temperature > 0):
            raise ValueError(f"debye_temperature must be a positive temperature in K, got {debye_temperature!r}")
        vectors = self.basis.vectors
        r = np.linalg.norm(vectors, axis=1)
        off = r > 1e-8
        r1 = r[off].min()
        unit = np.zeros_like(vectors)
        unit[off] = vectors[off] / r[off, None]
        stiffness = np.where(off, np.exp(-(r - r1) / (decay * r1)), 0.0)
        pair_fc = -stiffness[:, None, None] * unit[:, :, None] * unit[:, None, :]
        for kappa in range(self.n_atoms):  # on-site: −Σ of the off-site blocks of atom κ
            site = np.nonzero((self.basis.atom0 == kappa) & ~off)[0]
            pair_fc[site] = -pair_fc[(self.basis.atom0 == kappa) & off].sum(axis=0)
        self.set_force_constants(self.basis.project(pair_fc))
        q = mesh_q(self, (8, 8, 8))[1:]  # Γ (the translations) left out
        lowest = self.frequencies(q).min()
        if unstable_modes(lowest):
            raise StructureError(f"central springs within the cutoff {self.cutoff:.3f} Å leave this crystal unstable "
                                 f"(imaginary {-lowest:.3g} THz): use a larger cutoff (more shells), or start from a "
                                 "calculator or a phonopy file")
        with torch.no_grad():
            omega2 = torch.linalg.eigvalsh(self.dynamical_matrix(q)).clamp(min=0).mean().item()  # eV/Å²/amu
        hbar_omega_debye = HBAR_OMEGA_UNIT * np.sqrt(5 / 3 * omega2)
        scale = (KB * debye_temperature / hbar_omega_debye) ** 2
        return self.set_force_constants(self.theta.detach().cpu().numpy()[:self.basis.n_params] * scale)

    def set_from_calculator(self, calc, supercell_matrix=None, displacement: float = 0.01,
                            progress: bool = True) -> "ForceConstantModel":
        """Finite displacements (phonopy) with any ASE calculator, then projection onto the basis.

        Args:
            calc (ase.calculators.calculator.Calculator): any ASE calculator of the crystal (e.g. EMT(), a DFT or ML
                potential).
            supercell_matrix (array_like | None): (3, 3) int (or (3,) diagonal) relative to `unitcell`; None = the
                smallest diagonal one holding the cutoff.
            displacement: finite-displacement amplitude, Å.
            progress: show a tqdm progress bar over the displaced supercells.

        Returns:
            The model itself, θ (n_params,) eV/Å² projected from the finite-difference Φ.

        Raises:
            StructureError: a supercell too small to determine every θ.
        """
        from phonopy import Phonopy

        if supercell_matrix is None:
            supercell_matrix = diagonal_supercell_for(np.array(self.unitcell.cell[:]), self.cutoff)
        ph = Phonopy(to_phonopy_atoms(self.unitcell), supercell_matrix=np.asarray(supercell_matrix),
                     primitive_matrix=self.primitive_matrix, symprec=self.symprec)
        ph.generate_displacements(distance=displacement)
        forces = []
        for cell in tqdm(ph.supercells_with_displacements, desc="finite displacements", disable=not progress):
            atoms = Atoms(cell.symbols, cell=cell.cell, positions=cell.positions, pbc=True)
            atoms.calc = calc
            forces.append(atoms.get_forces())
        ph.forces = np.array(forces)
        ph.produce_force_constants()
        return self.set_from_phonopy(ph)

    def _check_species(self, phonopy_supercell) -> None:
        kappa = self.site_of(phonopy_supercell.positions)
        expected = np.array(self.primitive.get_chemical_symbols())[kappa]
        if not np.array_equal(expected, np.array(phonopy_supercell.symbols)):
            raise StructureError("the phonopy structure's species do not match the model's crystal")
