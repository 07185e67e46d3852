"""TDSFitted — an ASE calculator from fitted force constants (harmonic, fixed cell).

    atoms = bulk("Ni", "fcc", a=3.52, cubic=True).repeat(4)
    atoms.calc = TDSFitted("fit_out/")          # a folder written by `ase-tds fit`
    atoms.get_forces()                          # eV/Å

Energy and forces of a crystal whose atoms vibrate about the lattice sites of the crystal the force
constants were fitted to: E = ½ uᵀΦu (eV), F = −Φu (eV/Å), u the displacements (Å) from the sites.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from scipy.sparse import coo_matrix

from .covariance import lowest_frequency, unstable_modes
from .model import ForceConstantModel
from .structure import EXACT_LATTICE_TOL, StructureError, integer_matrix, pair_distances


class TDSFitted(Calculator):
    """Harmonic ASE calculator: E = ½ uᵀΦu (eV), F = −Φu (eV/Å) with fitted force constants Φ (eV/Å²).

    Phonopy force constants are projected onto a ForceConstantModel of phonopy's unit cell (see
    `ForceConstantModel.from_phonopy`): exact for files written by ase_tds; for others, pairs at and beyond half the
    shortest translation of phonopy's supercell are dropped.

    The atoms may be any supercell of the crystal (any supercell matrix, any atom order, wrapped or
    not; also one shorter than twice the cutoff: each pair's images are summed, as phonopy's supercell force
    constants are, which is the Hessian of that periodic supercell), at its reference lattice constants: the
    cell is fixed, so there is no stress (asking for it raises PropertyNotImplementedError). Each atom is
    assigned to the nearest lattice site of its crystal; u is its displacement from that ideal site — never
    from the positions first seen, so wrapping atoms into the cell changes nothing.

    The folded Φ is a sparse (3N, 3N) matrix, cached for the last (cell, species, site assignment),
    so molecular dynamics builds it once. Dynamically unstable force constants (a mode below −UNSTABLE_THZ,
    −1e-3 THz, on a 6×6×6 q mesh: `covariance.unstable_modes`) give a UserWarning.

    Args:
        source (ForceConstantModel | phonopy.Phonopy | str | Path): a ForceConstantModel (its θ at construction is used;
            later changes to θ are not seen), a folder holding phonopy_params.yaml (what `ase-tds fit` writes), a
            phonopy.load-able file or a phonopy.Phonopy with force constants.
        reference (Atoms | None): the ideal crystal in your frame when it is rigidly translated from the one the
            force constants belong to (same orientation); None = the model's sites.
        tolerance: Å; an atom farther than this from every lattice site is an error (no harmonic model
            describes it). None = 0.4 × the shortest site-to-site distance (1.0 Å for fcc Ni); it must stay
            below half of that distance, where the nearest site stops being unambiguous.
        warn_displacement: Å; a UserWarning is issued when any |u| exceeds it (default 0.5 Å, far beyond
            thermal amplitudes of a harmonic solid, e.g. rms |u| ≈ 0.13 Å for Ni at 300 K).
        **kwargs (Any): passed to ase.calculators.calculator.Calculator (e.g. label, directory).

    Raises:
        ValueError: `tolerance` outside (0, half the shortest site-to-site distance).
        StructureError: `reference` is not the force constants' crystal up to a translation, or no usable
            phonopy force constants (see `ForceConstantModel.from_phonopy`).
        TypeError: `source` is none of the accepted kinds.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, source, reference=None, tolerance: float | None = None,
                 warn_displacement: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.model = source if isinstance(source, ForceConstantModel) else ForceConstantModel.from_phonopy(source)
        lowest = lowest_frequency(self.model)
        if unstable_modes(lowest):
            name = source if isinstance(source, (str, os.PathLike)) else repr(self.model)
            warnings.warn(f"{name}: the force constants are dynamically unstable (imaginary modes down to "
                          f"{lowest:.3f} THz on a 6×6×6 q mesh): the energy ½uᵀΦu is negative along them and "
                          "dynamics runs away", UserWarning, stacklevel=2)
        self.model.short_range_only("TDSFitted")
        self._pair_fc = self.model.pair_force_constants().detach().cpu().numpy()
        self._primitive_cell = np.array(self.model.primitive.cell[:])
        self._site_fractions = self.model.primitive.get_scaled_positions(wrap=False)
        nearest = pair_distances(self.model.primitive, 2.0 * self.model.cutoff)[0]
        self.tolerance = 0.4 * nearest if tolerance is None else float(tolerance)
        if not 0 < self.tolerance < 0.5 * nearest:
            raise ValueError(f"tolerance must lie between 0 and {0.5 * nearest:.3f} Å (half the shortest "
                             f"site-to-site distance), got {tolerance!r}")
        self.warn_displacement = float(warn_displacement)
        self.origin = np.zeros(3) if reference is None else self._origin_of(reference)
        self._cached = (None, None)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """ASE's entry point: results energy = free_energy (eV) and forces (N, 3) eV/Å of `atoms`.

        Args:
            atoms (Atoms | None): a periodic supercell of the crystal (N atoms); None = the calculator's atoms.
            properties (Sequence[str]): the properties asked for (ASE's convention); energy and forces are always
                computed.
            system_changes (Sequence[str]): what changed since the last call (ASE's convention).

        Raises:
            StructureError: non-periodic atoms, a cell that is not a supercell of the crystal at its lattice
                constants, an atom farther than `tolerance` from every site, or a wrong species on a site.
        """
        super().calculate(atoms, properties, system_changes)
        if not np.all(self.atoms.pbc):
            raise StructureError(f"TDSFitted needs a periodic supercell (pbc={self.atoms.pbc.tolist()}); "
                                 "set atoms.pbc = True")
        u, sites = self.displacements(self.atoms)
        hessian = self._hessian(self.atoms, sites)
        forces = -(hessian @ u.ravel()).reshape(-1, 3)
        energy = -0.5 * float(u.ravel() @ forces.ravel())
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}

    def displacements(self, atoms) -> tuple[np.ndarray, np.ndarray]:
        """(u, sites): displacements (N, 3) Å from the nearest lattice sites, and those sites (N, 3) Å in the model's frame.

        Args:
            atoms (Atoms): ase.Atoms with N atoms on (or near) the sites of the crystal.

        Returns:
            u (N, 3) Å and sites (N, 3) Å, Cartesian, sites + u = positions − the `reference` translation.

        Raises:
            StructureError: an atom farther than `tolerance` from every site, or a wrong species on a site.
        """
        positions = atoms.positions - self.origin
        try:
            kappa = self.model.site_of(positions, tol=self.tolerance)
        except StructureError as err:
            raise StructureError(f"{err}: TDSFitted assigns each atom to the nearest lattice site within "
                                 f"tolerance={self.tolerance:.3f} Å; larger excursions (diffusion, melting, a "
                                 "different crystal) are outside a harmonic model") from None
        expected = self.model.primitive.numbers[kappa]
        wrong = np.nonzero(atoms.numbers != expected)[0]
        if wrong.size:
            i = int(wrong[0])
            raise StructureError(f"wrong species on a lattice site: atom {i} is {atoms.get_chemical_symbols()[i]} "
                                 f"but its site holds {self.model.primitive.get_chemical_symbols()[kappa[i]]} "
                                 f"({wrong.size} such atoms)")
        offset = positions @ np.linalg.inv(self._primitive_cell) - self._site_fractions[kappa]
        u = (offset - np.round(offset)) @ self._primitive_cell
        largest = np.linalg.norm(u, axis=1).max()
        if largest > self.warn_displacement:
            warnings.warn(f"an atom is displaced by {largest:.3f} Å from its lattice site (more than "
                          f"warn_displacement={self.warn_displacement} Å): the harmonic model may not apply",
                          UserWarning, stacklevel=2)
        return u, positions - u

    def _hessian(self, atoms, sites):
        """Φ folded onto this supercell, sparse (3N, 3N) eV/Å², atoms in the given order."""
        cell = np.array(atoms.cell[:])
        site_keys = np.round(sites @ np.linalg.inv(cell) * 1e6).astype(np.int64) % 1_000_000
        key = (cell.tobytes(), atoms.numbers.tobytes(), site_keys.tobytes())
        if self._cached[0] == key:
            return self._cached[1]
        self._check_supercell(atoms, cell, site_keys)
        entries = self.model.supercell_columns(sites, cell, np.arange(len(atoms)))  # (row, pair, column)
        xyz = np.arange(3)
        rows = 3 * entries[:, 0, None, None] + xyz[None, :, None]
        cols = 3 * entries[:, 2, None, None] + xyz[None, None, :]
        rows, cols = np.broadcast_to(rows, (len(entries), 3, 3)), np.broadcast_to(cols, (len(entries), 3, 3))
        data = self._pair_fc[entries[:, 1]]
        hessian = coo_matrix((data.ravel(), (rows.ravel(), cols.ravel())), shape=(3 * len(atoms),) * 2).tocsr()
        if self.model.born is not None:  # the dipole–dipole force constants of this periodic supercell (Ewald)
            hessian = hessian.toarray() + self._dipole_hessian(atoms, sites)  # dense: every pair interacts
        self._cached = (key, hessian)
        return hessian

    def _dipole_hessian(self, atoms, sites):
        """Φ_dd (3N, 3N) eV/Å² of the Born charges on this supercell: its image sum (`dipole_force_constants`)."""
        import torch

        from ase import Atoms

        from .dipole import dipole_force_constants

        ideal = Atoms(atoms.numbers, positions=sites, cell=atoms.cell, pbc=True)
        with torch.no_grad():
            full = dipole_force_constants(ideal, self.model.primitive, self.model.born_charges(), "full")
        return full.cpu().numpy().transpose(0, 2, 1, 3).reshape(3 * len(atoms), 3 * len(atoms))

    def _check_supercell(self, atoms, cell, site_keys) -> None:
        matrix = integer_matrix(cell, self._primitive_cell, "the cell is not a supercell of the reference crystal",
                                "TDSFitted is a fixed-cell model at the fitted lattice constants and orientation",
                                tol=EXACT_LATTICE_TOL)
        n_sites = int(round(abs(np.linalg.det(matrix)))) * self.model.n_atoms
        if len(atoms) != n_sites or len(np.unique(site_keys, axis=0)) != len(atoms):
            raise StructureError(f"the supercell has {n_sites} lattice sites but {len(atoms)} atoms on "
                                 f"{len(np.unique(site_keys, axis=0))} distinct sites; every site must hold one atom")

    def _origin_of(self, reference) -> np.ndarray:
        """Rigid translation (3,) Å from the model's crystal to `reference`."""
        model = self.model
        for kappa in np.nonzero(model.primitive.numbers == reference.numbers[0])[0]:
            shift = reference.positions[0] - model.primitive.positions[kappa]
            try:
                sites = model.site_of(reference.positions - shift)
            except StructureError:
                continue
            if np.array_equal(model.primitive.numbers[sites], reference.numbers):
                return shift
        raise StructureError("reference is not the force constants' crystal up to a translation "
                             "(same lattice constants, orientation and species on every site)")


def _ase_plugins() -> set:
    """This module's entry for ASE's calculator plug-ins (entry-point group "ase.plugins", setup.cfg).

    The plug-in machinery lives in ASE's private, experimental `ase._4` package, which older ASE lacks and
    which has moved between versions: anything going wrong there leaves the set empty (ASE then lists no
    plug-in from ase_tds) and never breaks `import ase_tds`.
    """
    try:
        from ase._4.plugins.plugin import CalculatorPlugin

        return {CalculatorPlugin("tds_fitted", implementation="ase_tds.calculator.TDSFitted",
                                 citation="ase_tds: force constants fitted to X-ray thermal diffuse scattering")}
    except Exception:  # ImportError, or an API that changed (TypeError, AttributeError, ...)
        return set()


__ase_plugins__ = _ase_plugins()
