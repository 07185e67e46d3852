"""TDSData: measured (or simulated) diffuse intensities on a list of Q points, and their files.

One point list: hkl (N, 3) in reciprocal-lattice units (r.l.u.) of `cell`, Cartesian Q (N, 3) in Å⁻¹
with Q = 2π·hkl·inv(cell)ᵀ, intensity (N,), σ (N,) and a mask (N,) bool, True = use the point.
Files (docs/data-format.md): an HDF5 point list, a NeXus NXdata volume on H, K, L axes, or an `.npz` with the
point-list keys, each read by its reader in ase_tds.io (the table ase_tds.io.readers.READERS). Every problem
with user data raises `TDSError` naming the file, the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from ase.geometry import cell_to_cellpar

from . import bragg
from .atomic import atomic_paths
from .covariance import check_temperature
from .io.base import TDSError
from .io.readers import reader_for
from .structure import StructureError, find_primitive, on_bragg_peaks, reciprocal_q

ABSOLUTE_UNITS = "e.u./atom"
CELL_LENGTH_RTOL = 1e-3
CELL_ANGLE_TOL_DEG = 0.1


@dataclass(eq=False)
class TDSData:
    """Diffuse intensities on N points of reciprocal space.

    Build with `from_hkl`, `from_q` or `read`; methods return new objects. Every field is checked on
    construction (finite values, matching shapes, σ > 0, Q = 2π·hkl·inv(cell)ᵀ).

    Args:
        q: Cartesian Q (N, 3), Å⁻¹.
        intensity: (N,) in `units`.
        hkl: (N, 3) r.l.u. of `cell`; None for Q-only data.
        sigma: 1σ of the intensity (N,), > 0, same units; None = not known.
        mask: (N,) bool, True = use the point; None = use all.
        temperature: K; None = not known (give it later, e.g. `require_temperature(override)`).
        units: "e.u./atom" = absolute (docs/theory.md); anything else or None = arbitrary units.
        cell: lattice vectors (3, 3) Å as rows, the cell the hkl index; None for Q-only data.
        source: names the file (or "TDSData") in error messages.
        provenance: how simulated data were made (the model's settings and its own error estimate), written
            to and read from the file's `provenance` attribute (JSON); None for measured data.

    Raises:
        TDSError: a field is missing, malformed, non-finite or inconsistent; the message names the field and
            the fix.
    """

    q: np.ndarray
    intensity: np.ndarray
    hkl: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mask: np.ndarray | None = None
    temperature: float | None = None
    units: str | None = None
    cell: np.ndarray | None = None
    source: str = "TDSData"
    provenance: dict | None = None

    def __post_init__(self):
        self.source = str(self.source)
        self.intensity = self._finite_array("intensity", self.intensity, ndim=1)
        n = len(self.intensity)
        if n == 0:
            raise self._error("intensity", "holds no points", "give at least one measured point")
        if self.hkl is not None:
            self.hkl = self._finite_array("hkl", self.hkl, shape=(n, 3), per_point=True)
        self.q = self._finite_array("q", self.q, shape=(n, 3), per_point=True)
        if self.cell is not None:
            self.cell = self._finite_array("cell", self.cell, shape=(3, 3))
            if abs(np.linalg.det(self.cell)) < 1e-6:
                raise self._error("cell", "has zero volume", "give the three lattice vectors (rows, Å) of the crystal")
        if self.hkl is not None:
            if self.cell is None:
                raise self._error("cell", "is missing but hkl are given",
                                  "give the cell the hkl index (the structure file passed with the data)")
            if not np.allclose(self.q, reciprocal_q(self.hkl, self.cell), rtol=1e-8, atol=1e-10):
                raise self._error("q", "disagrees with 2π·hkl·inv(cell)ᵀ",
                                  "build the data with TDSData.from_hkl so that Q is computed from hkl")
        if self.sigma is not None:
            self.sigma = self._finite_array("sigma", self.sigma, shape=(n,), per_point=True)
            bad = np.flatnonzero(self.sigma <= 0)
            if bad.size:
                raise self._error("sigma", f"has {bad.size} values ≤ 0 (first at index {bad[0]})",
                                  "σ must be > 0: correct those errors or drop the points")
        self.mask = self._boolean_mask(self.mask, n)
        if self.temperature is not None:
            self.temperature = self._positive_temperature(self.temperature, "temperature")
        if self.units is not None and not isinstance(self.units, str):
            raise self._error("units", f"is {self.units!r}, not text",
                              f'write units as a string, e.g. "{ABSOLUTE_UNITS}" or "arb."')

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_hkl(cls, hkl, intensity, cell, sigma=None, mask=None, temperature=None, units=None,
                 source="TDSData", provenance=None) -> TDSData:
        """Points at hkl (N, 3) r.l.u. of `cell` (3, 3) Å (or ase.Atoms / ase.cell.Cell); Q is computed.

        Args:
            hkl (array_like): (N, 3) r.l.u. of `cell`.
            intensity (array_like): (N,) in `units`.
            cell (array_like | Atoms): lattice vectors (3, 3) Å as rows, or an ase.Atoms / ase.cell.Cell.
            sigma (array_like | None): 1σ (N,) > 0, or None.
            mask (array_like | None): (N,) bool, True = use; None = all.
            temperature (float | None): K, or None.
            units (str | None): "e.u./atom" for absolute intensities, else arbitrary (None).
            source (str): the name used in error messages.
            provenance (dict | None): how simulated data were made (dict), or None.

        Returns:
            The data, with Q = 2π·hkl·inv(cell)ᵀ (N, 3) Å⁻¹.

        Raises:
            TDSError: malformed or inconsistent fields.
        """
        cell, hkl = _as_cell(cell), np.asarray(hkl)
        usable = _is_rows_of_3(hkl) and _is_rows_of_3(cell) and len(cell) == 3 and abs(np.linalg.det(cell)) >= 1e-6
        q = reciprocal_q(hkl, cell) if usable else hkl  # a malformed hkl or cell is reported by the validation
        return cls(q=q, intensity=intensity, hkl=hkl, sigma=sigma, mask=mask, temperature=temperature,
                   units=units, cell=cell, source=source, provenance=provenance)

    @classmethod
    def from_q(cls, q, intensity, sigma=None, mask=None, temperature=None, units=None, cell=None,
               source="TDSData") -> TDSData:
        """Points at Cartesian Q (N, 3) Å⁻¹; with a `cell` (3, 3) Å their hkl = Q·cellᵀ/2π are kept too.

        Args:
            q (array_like | torch.Tensor): Cartesian Q (N, 3), Å⁻¹.
            intensity (array_like): (N,) in `units`.
            sigma (array_like | None): 1σ (N,) > 0, or None.
            mask (array_like | None): (N,) bool, True = use; None = all.
            temperature (float | None): K, or None.
            units (str | None): "e.u./atom" for absolute intensities, else arbitrary (None).
            cell (array_like | Atoms | None): lattice vectors (3, 3) Å as rows (or ase.Atoms / ase.cell.Cell); None = Q
                only, no hkl, so `mask_bragg`, `mask_window` by hkl, `slice` and `write` are not available.
            source (str): the name used in error messages.

        Returns:
            The data.

        Raises:
            TDSError: malformed or inconsistent fields.
        """
        q = np.asarray(q, dtype=float)
        hkl = None
        if cell is not None:
            cell = _as_cell(cell)
            if _is_rows_of_3(q) and _is_rows_of_3(cell) and len(cell) == 3:  # else the validation reports them
                hkl = q @ cell.T / (2.0 * np.pi)
        return cls(q=q, intensity=intensity, hkl=hkl, sigma=sigma, mask=mask, temperature=temperature,
                   units=units, cell=cell, source=source)

    # ---- properties ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.intensity)

    @property
    def absolute(self) -> bool:
        """True when the intensities are in e.u. per atom (docs/theory.md), so no scale needs fitting."""
        return self.units == ABSOLUTE_UNITS

    @property
    def n_used(self) -> int:
        """Number of points the mask keeps."""
        return int(self.mask.sum())

    @property
    def q_norm(self) -> np.ndarray:
        """|Q| (N,) in Å⁻¹."""
        return np.linalg.norm(self.q, axis=1)

    # ---- checks -------------------------------------------------------------------------------

    def require_temperature(self, override=None) -> float:
        """The temperature (K) to model: `override` (e.g. --temperature) wins, else the file's.

        Args:
            override (float | None): K; None = use the data's own temperature.

        Returns:
            The temperature, K (> 0).

        Raises:
            TDSError: neither is given, or the temperature is not a positive number.
        """
        if override is not None:
            return self._positive_temperature(override, "temperature (override)")
        if self.temperature is None:
            raise self._error("temperature", "is missing",
                              "add the attribute temperature (K) to the file or pass --temperature T")
        return self.temperature

    def check_cell(self, structure_cell, structure_name="the structure") -> None:
        """Refuse a structure whose cell (3, 3) Å differs from the cell the hkl index.

        Lengths must agree to 1e-3 relative and angles to 0.1°; the orientation may differ. Data without a
        cell (Q only) are not checked.

        Args:
            structure_cell (array_like | Atoms): lattice vectors (3, 3) Å as rows, or an ase.Atoms / ase.cell.Cell.
            structure_name (str): how the error message names the structure.

        Raises:
            TDSError: the cells differ.
        """
        if self.cell is not None:
            _compare_cells(self.cell, _as_cell(structure_cell), self.source, structure_name)

    # ---- selections ---------------------------------------------------------------------------

    def with_mask(self, extra_mask) -> TDSData:
        """A copy whose mask also requires `extra_mask` (N,) bool to be True.

        Args:
            extra_mask (array_like): (N,) bool (or 0/1), True = keep using the point.

        Returns:
            A copy with mask = mask & extra_mask.

        Raises:
            TDSError: `extra_mask` is not (N,) boolean.
        """
        extra = self._boolean_mask(extra_mask, len(self), field="extra_mask")
        return dataclasses.replace(self, mask=self.mask & extra)

    def select(self, points) -> TDSData:
        """A copy holding only `points`: a boolean (N,) array or integer indices.

        Args:
            points (array_like): (N,) bool, True = keep; or integer indices (M,) of the points to keep, in that order.

        Returns:
            The M selected points, with their hkl, σ and mask.

        Raises:
            TDSError: a boolean `points` of another shape than (N,).
        """
        points = np.asarray(points)
        if points.dtype == bool and points.shape != (len(self),):
            raise self._error("select", f"got a boolean array of shape {points.shape}", f"give shape ({len(self)},)")

        def take(a):
            return None if a is None else a[points]

        return dataclasses.replace(self, q=self.q[points], intensity=self.intensity[points], hkl=take(self.hkl),
                                   sigma=take(self.sigma), mask=self.mask[points])

    def mask_bragg(self, radius: float = 0.1, primitive_cell=None, structure=None, units: str = "rlu") -> TDSData:
        """A copy with the points within `radius` of a Bragg peak masked out; a warning names peaks left in.

        The peaks: with `structure` (the crystal as ase.Atoms, in the Cartesian frame of `cell`, e.g. the structure
        the data were read with) its allowed reflections, whose structure factor with the X-ray form factors is not
        zero (ase_tds.bragg), and, for radius > 0, every point on a reciprocal-lattice vector of its primitive cell
        (where the diffuse model is not defined, extinct reflections too); with `primitive_cell` (3, 3) Å in the
        same frame (ase.Atoms accepted for its cell) every point of its reciprocal lattice; with neither, every
        integer hkl of `cell`. For a conventional fcc cell the structure or its primitive cell leaves only
        all-even / all-odd hkl as peaks; for diamond the structure also drops (2 0 0), which has no peak.

        Reflections whose nearest used points still hold intensities far above their surroundings (a radius too
        small for the peaks, or 0; `bragg.peaks_left`) are named in a UserWarning.

        Args:
            radius: in `units`, Euclidean in hkl ("rlu", r.l.u. of `cell`) or in Q ("invA", Å⁻¹); 0 masks nothing.
            primitive_cell (array_like | Atoms | None): lattice vectors (3, 3) Å (rows) or ase.Atoms; None = see above.
            structure (Atoms | None): the crystal, for its allowed reflections; not with `primitive_cell`.
            units: "rlu" or "invA".

        Returns:
            A copy with the points near a Bragg peak masked out (still held, mask False).

        Raises:
            TDSError: Q-only data (no hkl), a radius that is not a number ≥ 0, other units, both `structure` and
                `primitive_cell`, or a crystal (cell) that does not span the lattice of `cell`.
        """
        hkl = self._require_hkl("mask_bragg")
        if not (np.isscalar(radius) and np.isfinite(radius) and radius >= 0):
            raise self._error("radius", f"is {radius!r}", "give a radius ≥ 0 (0 masks nothing), e.g. 0.1 r.l.u.")
        if units not in bragg.UNITS:
            raise self._error("units", f"is {units!r}", f"give one of {bragg.UNITS} (r.l.u. or Å⁻¹)")
        if structure is not None and primitive_cell is not None:
            raise self._error("primitive_cell", "is given with a structure",
                              "give the structure (allowed reflections) or a primitive cell (every lattice point)")
        lattice = None if primitive_cell is None else _as_cell(primitive_cell)
        reach = np.maximum(bragg.reach(radius, units, self.cell), bragg.SHELL[1])
        try:
            reflections = bragg.reflections_near(hkl, self.cell, reach, structure=structure, lattice=lattice)
        except StructureError as err:
            raise self._error("structure" if structure is not None else "primitive_cell",
                              f"does not span the lattice of cell ({err})",
                              "give the crystal (or its primitive cell) of the same data in the same Cartesian "
                              "frame (e.g. from ase_tds.structure.find_primitive)") from None
        peak = bragg.near(hkl, self.cell, reflections, radius, units)
        if structure is not None and radius > 0:
            peak |= on_bragg_peaks(self.q, find_primitive(structure)[0].cell[:])
        masked = self.with_mask(~peak)
        left = bragg.peaks_left(hkl[masked.mask], self.intensity[masked.mask], reflections)
        if left:
            named = ", ".join(" ".join(f"{x:g}" for x in g) for g, _ in left[:3]) + (", ..." if len(left) > 3 else "")
            warnings.warn(f"{self.source}: used points next to {len(left)} Bragg reflection"
                          f"{'s' if len(left) > 1 else ''} ({named}) are up to {left[0][1]:.3g}× above their "
                          f"surroundings (intensity × distance²): Bragg peaks left in the data, which the diffuse "
                          f"model cannot fit; mask them with a larger radius: ase-tds fit --mask-bragg R (r.l.u., "
                          f"or e.g. 0.05invA), or TDSData.mask_bragg(R, structure=atoms)", UserWarning, stacklevel=2)
        return masked

    def mask_window(self, q_min=None, q_max=None, hkl_min=None, hkl_max=None) -> TDSData:
        """A copy with the points outside a detector-like window masked out.

        q_min ≤ |Q| ≤ q_max in Å⁻¹ and hkl_min ≤ hkl ≤ hkl_max (each (3,) r.l.u., per component); None = open.

        Args:
            q_min (float | None): smallest |Q| kept, Å⁻¹; None = no lower bound.
            q_max (float | None): largest |Q| kept, Å⁻¹; None = no upper bound.
            hkl_min (array_like | None): (3,) r.l.u., lower bound per component; None = none.
            hkl_max (array_like | None): (3,) r.l.u., upper bound per component; None = none.

        Returns:
            A copy with the points outside the window masked out (still held, mask False).

        Raises:
            TDSError: an hkl bound for Q-only data.
        """
        keep = np.ones(len(self), dtype=bool)
        if q_min is not None:
            keep &= self.q_norm >= q_min
        if q_max is not None:
            keep &= self.q_norm <= q_max
        if hkl_min is not None or hkl_max is not None:
            hkl = self._require_hkl("mask_window")
            if hkl_min is not None:
                keep &= np.all(hkl >= np.asarray(hkl_min, dtype=float), axis=1)
            if hkl_max is not None:
                keep &= np.all(hkl <= np.asarray(hkl_max, dtype=float), axis=1)
        return self.with_mask(keep)

    def slice(self, normal, offset: float = 0.0, thickness: float = 0.02) -> TDSData:
        """Only the points of one plane in hkl, e.g. (h k 0): normal=(0, 0, 1), offset=0.

        Keeps the points whose Euclidean distance in hkl from the plane normal·hkl = offset is at most
        thickness/2 (r.l.u.); e.g. h + k + l = 2 is normal=(1, 1, 1), offset=2.

        Args:
            normal (array_like): (3,) the plane's normal in hkl (any length).
            offset: r.l.u. along the unit normal times |normal|: the plane is normal·hkl = offset.
            thickness: full thickness of the slab, r.l.u.

        Returns:
            Only the points of the slab (the others are dropped, not masked).

        Raises:
            TDSError: Q-only data, or no point within the slab.
        """
        hkl = self._require_hkl("slice")
        normal = np.asarray(normal, dtype=float)
        distance = np.abs(hkl @ normal - offset) / np.linalg.norm(normal)
        keep = distance <= thickness / 2
        if not keep.any():
            raise self._error("hkl", f"has no points within {thickness / 2} r.l.u. of the plane {normal}·hkl = {offset}",
                              "check the plane, or widen it with a larger thickness")
        return self.select(keep)

    # ---- files --------------------------------------------------------------------------------

    @classmethod
    def read(cls, path, structure=None, temperature=None, bin: int = 1) -> TDSData:
        """Read a data file: an HDF5 point list (docs/data-format.md), a NeXus NXdata volume, or an `.npz` point list.

        The format is the first of the reader table (ase_tds.io.readers.READERS) that takes the file.

        The structure may be left out only when the file stores the cell in a `cell` dataset; when both are
        there they must agree. `bin` (NeXus volumes only) averages bin³ voxels into one point (their mean hkl
        and mean intensity, σ = √Σσ²/n over the n measured voxels of the block; a remainder at the end of an
        axis is left out), for a quick first fit. A volume is read in slabs, and only its measured (finite)
        voxels are kept.

        Args:
            path (str | Path): the data file.
            structure (Atoms | array_like | None): ase.Atoms or cell (3, 3) Å whose cell the hkl index;
                None = the file's `cell` dataset.
            temperature (float | None): K, overrides the file's attribute; None = the file's.
            bin: voxels per axis averaged into one point (NeXus volumes only); 1 = every voxel.

        Returns:
            The data; `source` is the path.

        Raises:
            FileNotFoundError: no file at `path`.
            TDSError: an unreadable format, a missing or malformed field, a cell that differs from the
                structure's, or `bin` for a point list; the message names the file, the field and the fix.
        """
        if not (isinstance(bin, (int, np.integer)) and bin >= 1):
            raise TDSError(f"bin must be a whole number of voxels ≥ 1 per axis, got {bin!r}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        reader = reader_for(path)  # the format: ase_tds.io.readers.READERS
        if bin > 1 and not reader.volume:
            raise TDSError(f"{path}: bin={bin} averages the voxels of a NeXus volume, and this file is a point list; "
                           "read it without bin")
        fields = reader.read(path, bin=bin) if reader.volume else reader.read(path)
        stored_cell = fields.pop("cell", None)
        if structure is None and stored_cell is None:
            raise TDSError(f"{path}: field 'hkl' indexes the cell of a structure file, and none was given; "
                           "pass the structure (e.g. TDSData.read(path, structure=atoms) or the STRUCTURE argument)")
        cell = _as_cell(structure) if structure is not None else stored_cell
        if structure is not None and stored_cell is not None:
            _compare_cells(np.asarray(stored_cell, dtype=float), cell, str(path), _structure_name(structure))
        data = cls.from_hkl(cell=cell, source=str(path), **fields)
        if temperature is not None:
            data = dataclasses.replace(data, temperature=data.require_temperature(temperature))
        return data

    def write(self, path) -> None:
        """Write the HDF5 point list (docs/data-format.md) plus a `cell` dataset; atomic: all or nothing on disk.

        Args:
            path (str | Path): the HDF5 file to write; an existing one is replaced.

        Raises:
            TDSError: Q-only data (the point list stores hkl).
        """
        path = Path(path)
        hkl = self._require_hkl("write")
        with atomic_paths(path) as (tmp,), h5py.File(tmp, "w") as f:
            f.create_dataset("hkl", data=hkl)
            f.create_dataset("intensity", data=self.intensity)
            if self.sigma is not None:
                f.create_dataset("sigma", data=self.sigma)
            f.create_dataset("mask", data=self.mask)
            f.create_dataset("cell", data=self.cell)
            if self.temperature is not None:
                f.attrs["temperature"] = self.temperature
            if self.units is not None:
                f.attrs["units"] = self.units
            if self.provenance is not None:
                f.attrs["provenance"] = json.dumps(self.provenance, ensure_ascii=False)

    # ---- helpers ------------------------------------------------------------------------------

    def _error(self, field: str, problem: str, fix: str) -> TDSError:
        return TDSError(f"{self.source}: field '{field}' {problem}; {fix}")

    def _finite_array(self, field, values, ndim=None, shape=None, per_point=False) -> np.ndarray:
        """`values` as a finite float array of `ndim` dimensions or of `shape` (per_point: shape[0] = N points)."""
        try:
            array = np.asarray(values, dtype=float)
        except (TypeError, ValueError):
            raise self._error(field, "is not numeric", "give an array of numbers") from None
        if ndim is not None and array.ndim != ndim:
            raise self._error(field, f"has shape {array.shape}", f"give a {ndim}-dimensional array (N,)")
        if shape is not None and array.shape != shape:
            rows = f", one entry per point (N = {shape[0]}, as in intensity)" if per_point else ""
            raise self._error(field, f"has shape {array.shape}", f"give an array of shape {shape}{rows}")
        bad = np.flatnonzero(~np.isfinite(array).all(axis=tuple(range(1, array.ndim))))
        if bad.size:
            raise self._error(field, f"has {len(bad)} NaN/inf entries (first at index {bad[0]})",
                              "drop those points, or mark them with mask = false and give finite values")
        return array

    def _boolean_mask(self, values, n, field="mask") -> np.ndarray:
        if values is None:
            return np.ones(n, dtype=bool)
        array = np.asarray(values)
        if array.shape != (n,):
            raise self._error(field, f"has shape {array.shape}, the other fields need ({n},)",
                              "give one true/false per point")
        if array.dtype == bool:
            return array.copy()
        if array.dtype.kind in "iuf" and np.all((array == 0) | (array == 1)):
            return array.astype(bool)
        raise self._error(field, f"is not boolean (dtype {array.dtype})", "give true (use) / false (skip), or 1 / 0")

    def _positive_temperature(self, value, field) -> float:
        try:
            value = float(np.asarray(value, dtype=float).reshape(()))
        except (TypeError, ValueError):
            raise self._error(field, f"is {value!r}, not one number", "give the temperature in K") from None
        try:  # a measurement's temperature: > 0 K (the one rule, covariance.check_temperature)
            check_temperature(value, None)
        except ValueError:
            raise self._error(field, f"is {value} K", "give a positive temperature in K") from None
        return value

    def _require_hkl(self, operation) -> np.ndarray:
        if self.hkl is None:
            raise self._error("hkl", f"is needed by {operation} but the data hold Q only",
                              "build the data with a cell (TDSData.from_q(..., cell=...)) or from hkl")
        return self.hkl


def add_poisson_noise(data: TDSData, counts: float, rng=None) -> TDSData:
    """A copy of `data` with Poisson counting noise, the MEAN used intensity counting as `counts` counts.

    scale = counts / mean(intensity[mask]); count ~ Poisson(scale·intensity); intensity = count/scale,
    sigma = √max(count, 1)/scale, so the relative σ at the mean intensity is ≈ 1/√counts.
    Deterministic for a given Generator or seed. Intensities must be ≥ 0.

    Args:
        data: noise-free data, intensities ≥ 0.
        counts: counts at the mean used intensity, > 0 (e.g. 1e4: ≈ 1 % σ there).
        rng (np.random.Generator | int | None): numpy Generator, seed, or None (fresh entropy).

    Returns:
        A copy with noisy intensities and their σ (N,), in the units of `data`.

    Raises:
        TDSError: counts ≤ 0, negative intensities, or no positive used intensity.
    """
    rng = np.random.default_rng(rng)
    if counts <= 0:
        raise data._error("counts", f"is {counts}", "give a positive count level, e.g. 1e4")
    if np.any(data.intensity < 0):
        raise data._error("intensity", "has negative values, which Poisson noise cannot model",
                          "add noise to the noise-free intensities (≥ 0)")
    mean = data.intensity[data.mask].mean() if data.n_used else 0.0
    if mean <= 0:
        raise data._error("intensity", "has no positive used values", "give noise-free intensities > 0")
    scale = counts / mean
    count = rng.poisson(data.intensity * scale).astype(float)
    return dataclasses.replace(data, intensity=count / scale, sigma=np.sqrt(np.maximum(count, 1.0)) / scale)


def _is_rows_of_3(array) -> bool:
    """True for a finite numeric array of shape (N, 3)."""
    array = np.asarray(array)
    return array.dtype.kind in "iuf" and array.ndim == 2 and array.shape[1] == 3 and bool(np.isfinite(array).all())


def _as_cell(structure) -> np.ndarray:
    """Lattice vectors (3, 3) Å (rows) of an ase.Atoms, ase.cell.Cell or array."""
    return np.array(getattr(structure, "cell", structure), dtype=float)


def _structure_name(structure) -> str:
    formula = getattr(structure, "get_chemical_formula", None)
    return f"the structure {formula()}" if formula else "the given cell"


def _compare_cells(cell, structure_cell, source: str, structure_name: str) -> None:
    """Refuse cells (3, 3) Å whose lengths differ by > 1e-3 relative or angles by > 0.1°."""
    ours, theirs = cell_to_cellpar(cell), cell_to_cellpar(structure_cell)
    if not (np.allclose(ours[:3], theirs[:3], rtol=CELL_LENGTH_RTOL, atol=0.0)
            and np.allclose(ours[3:], theirs[3:], rtol=0.0, atol=CELL_ANGLE_TOL_DEG)):
        raise TDSError(
            f"{source}: field 'cell' (a, b, c, α, β, γ = {_format_cellpar(ours)}), the cell the hkl index, differs "
            f"from the cell of {structure_name} ({_format_cellpar(theirs)}); pass the structure file the hkl were "
            "indexed in, or re-index the hkl in this structure's cell")


def _format_cellpar(cellpar) -> str:
    return ", ".join(f"{x:.4f}" for x in cellpar)
