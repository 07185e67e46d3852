"""NeXus NXdata volumes on H, K, L axes, read as a point list of their measured voxels.

An HDF5 file without `hkl` or `intensity` at its root is searched for its NXdata group (the `default` attributes
choose among several); docs/data-format.md lists the fields taken. A volume is read in slabs of about
NEXUS_SLAB_VOXELS voxels, and only its measured (finite) voxels are kept. A `weights` field divides the signal, as
nexusformat's `NXdata.nxweights` / `NXdata.weighted_data` do (nexusformat/nexus/tree.py): NXRefine's transforms
(ase_tds.io.nxrefine) store the summed signal and the number of contributions so.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .base import Reader, TDSError, text
from .hdf5 import holds_point_list, open_hdf5

NEXUS_SLAB_VOXELS = 2**22  # voxels read at a time from a NeXus volume


def can_read(path: Path) -> bool:
    """True for an HDF5 file that is not a point list (no `hkl` or `intensity` at its root)."""
    return h5py.is_hdf5(path) and not holds_point_list(path)


def read_volume(path: Path, bin: int = 1) -> dict:
    """The fields (ase_tds.io.base) of the file's NXdata volume: its measured voxels, or bin³ averages of them."""
    with open_hdf5(path) as f:
        return read_nxdata(_find_nxdata(f, path), path, bin)


def _find_nxdata(f: h5py.File, path: Path) -> h5py.Group:
    groups = []
    f.visititems(lambda name, item: groups.append(item)
                 if isinstance(item, h5py.Group) and text(item.attrs.get("NX_class")) == "NXdata" else None)
    if len(groups) == 1:
        return groups[0]
    if not groups:
        raise TDSError(f"{path}: no datasets 'hkl' and 'intensity' (point list) and no NXdata group; "
                       "write the data as in docs/data-format.md")
    node = f  # several volumes: follow the NeXus `default` attributes from the root
    while isinstance(node, h5py.Group) and text(node.attrs.get("NX_class")) != "NXdata":
        default = text(node.attrs.get("default"))
        if default is None or default not in node:
            raise TDSError(f"{path}: several NXdata groups ({', '.join(g.name for g in groups)}); "
                           "name the one to read with the `default` attributes of the root and entry")
        node = node[default]
    return node


def read_nxdata(group: h5py.Group, path: Path, bin: int = 1, positive_only: bool = False) -> dict:
    """The measured voxels of an NXdata volume (or bin³ averages of them), read in slabs along its first axis.

    A voxel is measured where its signal (and σ) is finite and its weight, if the group has `weights`, is > 0; its
    intensity is signal/weights and its σ errors/weights, or without errors √max(|signal|, 1)/weights (the signal
    taken as Poisson counts summed over `weights` contributions). positive_only: in a volume without weights, a
    signal ≤ 0 is unmeasured too (NXRefine's merged transforms, ase_tds.io.nxrefine).

    Returns:
        The fields of ase_tds.io.base: hkl (M, 3) r.l.u., intensity (M,), σ (M,) or None, temperature, units, cell.
    """
    where = f"{path}:{group.name}"
    signal_name, signal = _signal(group, where)
    components, centres = _axes(group, signal, where)
    errors = _per_voxel(group, signal, next((n for n in ("errors", f"{signal_name}_errors") if n in group), None),
                        where, "σ")
    weights_name = next((n for n in (f"{signal_name}_weights", text(signal.attrs.get("weights")), "weights")
                         if n is not None and n in group), None)
    weights = _per_voxel(group, signal, weights_name, where, "weight")
    shape = np.array(signal.shape) // bin
    if np.any(shape == 0):
        raise TDSError(f"{where}: bin={bin} is larger than the volume {signal.shape}; use a smaller bin")
    centres = [c[: n * bin].reshape(n, bin).mean(axis=1) for c, n in zip(centres, shape)]
    hkl, values, sigma = _read_slabs(signal, errors, weights, centres, shape, bin, positive_only)
    hkl = hkl[:, [components.index(c) for c in "hkl"]]
    return dict(hkl=hkl, intensity=values, sigma=sigma, mask=None, temperature=_nexus_temperature(group),
                units=text(signal.attrs.get("units", group.attrs.get("units"))),
                cell=group["cell"][()] if "cell" in group else None)


def _dataset(group: h5py.Group, name: str, where: str) -> h5py.Dataset:
    """group[name]; a link that cannot be followed (NXRefine links its transforms' data to another file) is a
    TDSError naming its target."""
    item = group.get(name)
    if item is None:
        link = group.get(name, getlink=True)
        target = f"{link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else getattr(link, "path", name)
        raise TDSError(f"{where}: field '{name}' links to {target}, which cannot be opened; keep the linked file "
                       "where the link points (relative to this file's folder) and read again")
    return item


def _per_voxel(group: h5py.Group, signal: h5py.Dataset, name: str | None, where: str, what: str):
    """The dataset `name` of the group (None when not given), one value per voxel of the signal."""
    if name is None:
        return None
    values = _dataset(group, name, where)
    if values.shape != signal.shape:
        raise TDSError(f"{where}: field '{name}' has shape {values.shape} for a signal of shape {signal.shape}; "
                       f"give one {what} per voxel")
    return values


def _signal(group: h5py.Group, where: str):
    """(name, dataset) of the group's 3D intensity: the `signal` attribute's, or the older style's signal=1."""
    signal_name = text(group.attrs.get("signal"))
    if signal_name is None:  # older style: signal=1 on the dataset itself
        signal_name = next((name for name, item in group.items()
                            if isinstance(item, h5py.Dataset) and text(item.attrs.get("signal")) == "1"), None)
    if signal_name is None or signal_name not in group:
        raise TDSError(f"{where}: field 'signal' does not name an intensity dataset; set the group attribute "
                       "signal='<dataset name>'")
    signal = _dataset(group, signal_name, where)  # an h5py dataset: read later in slabs
    if signal.ndim != 3:
        raise TDSError(f"{where}: field '{signal_name}' has shape {signal.shape}; an NXdata volume needs a 3D "
                       "intensity on H, K, L axes")
    return signal_name, signal


def _axes(group: h5py.Group, signal: h5py.Dataset, where: str):
    """(components, centres): each dimension's "h", "k" or "l", and its voxel centres (r.l.u.)."""
    axes = group.attrs.get("axes", signal.attrs.get("axes"))
    axes = [text(a) for a in np.atleast_1d(axes)] if axes is not None else []
    if len(axes) == 1:
        axes = axes[0].replace(",", ":").split(":")
    if len(axes) != 3 or any(a not in group for a in axes):
        raise TDSError(f"{where}: field 'axes' is {axes}; set axes=['H', 'K', 'L'] naming three 1D axis datasets "
                       "of the group")
    # the axes by name, in any order of the signal's dimensions: H, K, L (also "h", "[H,0,0]", NXRefine's "Qh", ...)
    components = ["".join(c for c in a.lower() if c not in "[], 0") for a in axes]
    components = [c[1:] if len(c) == 2 and c[0] == "q" else c for c in components]
    if sorted(components) != ["h", "k", "l"]:
        raise TDSError(f"{where}: field 'axes' is {axes}; name the three axis datasets H, K and L (or Qh, Qk, Ql; "
                       "any order), e.g. axes=['H', 'K', 'L'], so that each dimension's reciprocal-lattice direction "
                       "is known")
    centres = []
    for dim, name in enumerate(axes):
        values = np.asarray(group[name][()], dtype=float).ravel()
        n = signal.shape[dim]
        if len(values) == n + 1:  # histogram bin edges
            values = 0.5 * (values[1:] + values[:-1])
        if len(values) != n:
            raise TDSError(f"{where}: field '{name}' has {len(values)} values but the intensity has {n} along "
                           f"axis {dim}; give one value (or n+1 bin edges) per voxel")
        centres.append(values)
    return components, centres


def _read_slabs(signal, errors, weights, centres, shape, bin: int, positive_only: bool):
    """(hkl (M, 3) in the signal's axis order, intensity (M,), σ (M,) or None) of the M measured bin³ blocks."""
    rows = max(1, NEXUS_SLAB_VOXELS // (int(np.prod(signal.shape[1:])) * bin)) * bin  # voxel rows per slab
    parts = []
    for start in range(0, shape[0] * bin, rows):
        stop = min(start + rows, shape[0] * bin)
        window = np.s_[start:stop, : shape[1] * bin, : shape[2] * bin]
        block, sigma, measured = _voxels(*(None if a is None else np.asarray(a[window], dtype=float)
                                           for a in (signal, errors, weights)), positive_only)
        grouped = lambda a: a.reshape(-1, bin, shape[1], bin, shape[2], bin).sum(axis=(1, 3, 5))
        count = grouped(measured.astype(float))
        mean = grouped(np.where(measured, block, 0.0)) / np.maximum(count, 1)
        keep = np.nonzero(count > 0)
        index = (keep[0] + start // bin, keep[1], keep[2])
        sig = None if sigma is None else np.sqrt(grouped(np.where(measured, sigma, 0.0) ** 2))[keep] / count[keep]
        parts.append((np.stack([centres[d][index[d]] for d in range(3)], axis=-1), mean[keep], sig))
    hkl = np.concatenate([p[0] for p in parts]).reshape(-1, 3)
    values = np.concatenate([p[1] for p in parts])
    sigma = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    return hkl, values, sigma


def _voxels(signal, errors, weights, positive_only: bool):
    """(intensity, σ or None, measured) of one slab's voxels, each array of the slab's shape (read_nxdata)."""
    measured = np.isfinite(signal) & (np.isfinite(errors) if errors is not None else True)
    if weights is None:
        return signal, errors, (measured & (signal > 0)) if positive_only else measured
    measured &= weights > 0
    weights = np.where(measured, weights, 1.0)
    counted = errors if errors is not None else np.sqrt(np.maximum(np.abs(signal), 1.0))
    return signal / weights, counted / weights, measured


def _nexus_temperature(group: h5py.Group):
    """The `temperature` attribute of the NXdata group or of an ancestor, or of an ancestor's `sample`."""
    node = group
    while True:
        if "temperature" in node.attrs:
            return node.attrs["temperature"]
        sample = node.get("sample")
        if isinstance(sample, h5py.Group):
            if "temperature" in sample.attrs:
                return sample.attrs["temperature"]
            if isinstance(sample.get("temperature"), h5py.Dataset):
                return float(np.mean(sample["temperature"][()]))
        if node.name == "/":
            return None
        node = node.parent


READER = Reader("nexus", can_read, read_volume, volume=True)
