"""Points to simulate at (`ase-tds simulate --hkl FILE`): a text table of 'h k l' rows, or an `.npy` array (N, 3).

The table's last entry: any file that is neither HDF5 nor a zip archive is tried as one.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import h5py
import numpy as np

from .base import Reader, TDSError, check_hkl


def can_read(path: Path) -> bool:
    """True for a file that is neither HDF5 nor a zip archive (.npz)."""
    return not (h5py.is_hdf5(path) or zipfile.is_zipfile(path))


def read_hkl_table(path: Path) -> dict:
    """{"hkl": (N, 3)} of an .npy file or a text file of rows; TDSError when it is not N ≥ 1 rows of three numbers."""
    try:
        hkl = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    except (ValueError, EOFError) as err:
        raise TDSError(f"{path}: not a table of numbers ({err}); give one 'h k l' row per point") from None
    return {"hkl": check_hkl(hkl, path)}


READER = Reader("hkl-text", can_read, read_hkl_table, points_only=True)
