"""NXRefine's reciprocal-space volumes (the reduction at CHESS QM2 and APS 6-ID-D), with the temperature and lattice
NXRefine records beside them.

The layout, as NXRefine writes it (github.com/nexpy/nxrefine, src/nxrefine/: nxrefine.py `prepare_transform`,
`read_parameters`, `write_parameters`; nxreduce.py `prepare_combine`; nxbeamline.py `read_logs`; nxsymmetry.py), and
as nxs_analysis_tools reads it (src/nxs_analysis_tools/datareduction.py `load_transform`: entry/transform's `data`,
transposed (2, 1, 0) onto Qh, Qk, Ql):

- `/<entry>/transform` and `/<entry>/masked_transform`: NXdata(data, [Ql, Qk, Qh]), the signal `data` of shape
  (nl, nk, nh) on axes Ql, Qk, Qh in r.l.u. In a scan entry (`f1`, `f2`, ...) `data` is CCTW's summed signal
  (`cctw transform --normalization 0`) and `weights` the number of contributions summed into each voxel, both
  external links into the scan's transform file; the merged `/entry/transform` (`cctw merge --normalization 1`) holds
  the normalised signal without weights. `masked_transform` has the voxels of NXRefine's 3D peak mask left out.
- `/entry/sample` (NXsample, linked into the scan entries): `temperature` (attribute `units`), the lattice as
  `unit_cell` [a, b, c, α, β, γ], or `unit_cell_abc` and `unit_cell_alphabetagamma`, or `unitcell_a`, `unitcell_b`,
  `unitcell_c`, `unitcell_alpha`, `unitcell_beta`, `unitcell_gamma` (Å, degrees), tried in that order as NXRefine does.

What is read (docs/data-format.md):

- the entry named by the root's `default` attribute, else `entry`, else the only entry holding a transform; in it
  `masked_transform` where there is one (the diffuse scattering without the masked peaks), else `transform`;
- intensity = data/weights and σ = √max(|data|, 1)/weights (ase_tds.io.nexus.read_nxdata), voxels of weight 0 left
  out. NXRefine's weights count contributions, they are not 1/σ²: σ takes `data` as Poisson counts summed over them,
  exact for counts and otherwise a relative weighting that the fitted scale does not correct (χ²_red says so). An
  `errors` field, where present, is σ of `data`: σ = errors/weights. Without weights (the merged transform) the
  intensity is `data` and σ is not known, and a voxel with data ≤ 0 counts as unmeasured, as in NXRefine's own
  symmetrisation (nxsymmetry.py `symmetrize_data`: weight 1 where the signal is > 0);
- the temperature in K (°C converted) and the cell from the lattice parameters (ASE's standard orientation: its
  lengths and angles are compared with the structure's).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from ase.geometry import cellpar_to_cell

from .base import Reader, TDSError, text
from .hdf5 import holds_point_list, open_hdf5
from .nexus import read_nxdata

VOLUMES = ("masked_transform", "transform")  # NXRefine's NXdata groups of an entry, in order of preference
KELVIN = ("k", "kelvin")
CELSIUS = ("c", "degc", "celsius", "°c")


def can_read(path: Path) -> bool:
    """True for an HDF5 file, not a point list, with an NXentry that holds a `transform` or `masked_transform`."""
    if not h5py.is_hdf5(path) or holds_point_list(path):
        return False
    with open_hdf5(path) as f:
        return bool(_entries_with_volumes(f))


def read_transform(path: Path, bin: int = 1) -> dict:
    """The fields (ase_tds.io.base) of the file's NXRefine volume: its measured voxels, or bin³ averages of them."""
    with open_hdf5(path) as f:
        entry = _entry(f, path)
        group = entry[next(name for name in VOLUMES if name in entry)]
        fields = read_nxdata(group, path, bin, positive_only=True)  # (without weights: the merged transform)
        sample = _sample(entry, f)
        where = f"{path}:{sample.name}" if sample is not None else str(path)
        fields.update(temperature=_temperature(sample, where), cell=_cell(sample, where))
        return fields


def _entries_with_volumes(f: h5py.File) -> dict[str, h5py.Group]:
    """{name: group} of the file's NXentry groups that hold an NXdata `transform` or `masked_transform`."""
    return {name: item for name, item in f.items()
            if isinstance(item, h5py.Group) and text(item.attrs.get("NX_class")) == "NXentry"
            and any(isinstance(item.get(v), h5py.Group) and text(item[v].attrs.get("NX_class")) == "NXdata"
                    for v in VOLUMES)}


def _entry(f: h5py.File, path: Path) -> h5py.Group:
    """The entry to read: the root's `default`, else `entry`, else the only one with a volume."""
    entries = _entries_with_volumes(f)
    for name in (text(f.attrs.get("default")), "entry"):
        if name in entries:
            return entries[name]
    if len(entries) == 1:
        return next(iter(entries.values()))
    raise TDSError(f"{path}: the entries {', '.join(sorted(entries))} each hold a transform and none is the merged "
                   "/entry; name the one to read with the root's `default` attribute (e.g. default='f1'), or merge "
                   "the scans with NXRefine first")


def _sample(entry: h5py.Group, f: h5py.File) -> h5py.Group | None:
    """The entry's `sample` (or other NXsample group), else /entry/sample (NXRefine's shared sample); None if none."""
    for group in (entry, f.get("entry")):
        if not isinstance(group, h5py.Group):
            continue
        if isinstance(group.get("sample"), h5py.Group):
            return group["sample"]
        sample = next((item for item in group.values() if isinstance(item, h5py.Group)
                       and text(item.attrs.get("NX_class")) == "NXsample"), None)
        if sample is not None:
            return sample
    return None


def _temperature(sample: h5py.Group | None, where: str) -> float | None:
    """The sample's temperature in K (its mean, for a log), from its `units` (K or °C; none: K); None if absent."""
    if sample is None or "temperature" not in sample:
        return None
    field = sample["temperature"]
    values = np.asarray(field[()], dtype=float)
    units = (text(field.attrs.get("units")) or "K").strip().lower()
    if units in KELVIN:
        return float(values.mean())
    if units in CELSIUS:
        return float(values.mean()) + 273.15
    raise TDSError(f"{where}: field 'temperature' has units {units!r}; give it in K (or °C), or pass the "
                   "temperature (--temperature T)")


def _cell(sample: h5py.Group | None, where: str) -> np.ndarray | None:
    """Lattice vectors (3, 3) Å (rows, ASE's standard orientation) of the sample's lattice parameters, or None."""
    if sample is None:
        return None

    def field(name):
        return np.asarray(sample[name][()], dtype=float).ravel() if name in sample else None

    single = [field(f"unitcell_{name}") for name in ("a", "b", "c", "alpha", "beta", "gamma")]
    cellpar = field("unit_cell")
    if cellpar is None and field("unit_cell_abc") is not None and field("unit_cell_alphabetagamma") is not None:
        cellpar = np.concatenate([field("unit_cell_abc"), field("unit_cell_alphabetagamma")])
    if cellpar is None and all(value is not None for value in single):
        cellpar = np.concatenate(single)
    if cellpar is None:
        return None
    if cellpar.shape != (6,) or not np.all(np.isfinite(cellpar)) or np.any(cellpar <= 0):
        raise TDSError(f"{where}: the lattice parameters are {cellpar.tolist()}; give a, b, c (Å) and α, β, γ "
                       "(degrees), six positive numbers, or leave them out and pass the structure")
    return cellpar_to_cell(cellpar)


READER = Reader("nxrefine", can_read, read_transform, volume=True)
