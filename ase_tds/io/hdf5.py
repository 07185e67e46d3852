"""HDF5 point lists (docs/data-format.md): datasets `hkl`, `intensity`, optional `sigma`, `mask`, `cell`;
attributes `temperature`, `units`, `provenance`. Also a file of `hkl` alone: points to simulate at.

`open_hdf5` is the one way the readers open HDF5 (here and in nexus.py): a truncated or corrupt file is refused
with a TDSError naming it, not h5py's OSError.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import h5py

from .base import Reader, TDSError, check_hkl, text


@contextlib.contextmanager
def open_hdf5(path: Path):
    """h5py.File(path, "r"); a file h5py cannot open or read (truncated, corrupt) raises TDSError naming it."""
    try:
        with h5py.File(path, "r") as f:
            yield f
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (OSError, RuntimeError, KeyError) as err:  # h5py's errors for a damaged file, while opening or reading
        reason = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise TDSError(f"{path}: an HDF5 file that cannot be read ({reason}); it is truncated or corrupt (e.g. an "
                       "interrupted copy or write): copy or write it again") from err


def holds_point_list(path: Path) -> bool:
    """True for an HDF5 file with a dataset `hkl` or `intensity` at its root."""
    if not h5py.is_hdf5(path):
        return False
    with open_hdf5(path) as f:
        return "hkl" in f or "intensity" in f


def _holds_hkl_only(path: Path) -> bool:
    if not h5py.is_hdf5(path):
        return False
    with open_hdf5(path) as f:
        return "hkl" in f and "intensity" not in f


def read_point_list(path: Path) -> dict:
    """The fields of an HDF5 point list (ase_tds.io.base); TDSError when `hkl` or `intensity` is missing."""
    with open_hdf5(path) as f:
        for name in ("hkl", "intensity"):
            if name not in f:
                raise TDSError(f"{path}: no dataset '{name}'; a point list needs 'hkl' (N, 3) and 'intensity' (N,) "
                               "(docs/data-format.md)")

        def optional(name):
            return f[name][()] if name in f else None

        provenance = text(f.attrs.get("provenance"))
        try:
            provenance = json.loads(provenance) if provenance else None
        except json.JSONDecodeError:
            provenance = None  # another program's attribute of that name: not ours to read
        return dict(hkl=f["hkl"][()], intensity=f["intensity"][()], sigma=optional("sigma"), mask=optional("mask"),
                    temperature=f.attrs.get("temperature"), units=text(f.attrs.get("units")), cell=optional("cell"),
                    provenance=provenance if isinstance(provenance, dict) else None)


def read_hkl_list(path: Path) -> dict:
    """{"hkl": (N, 3)} of an HDF5 file holding `hkl` without intensities."""
    with open_hdf5(path) as f:
        return {"hkl": check_hkl(f["hkl"][()], path)}


POINT_LIST = Reader("hdf5", holds_point_list, read_point_list)
HKL_LIST = Reader("hdf5-hkl", _holds_hkl_only, read_hkl_list, points_only=True)
