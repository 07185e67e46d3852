"""What every reader of the table (ase_tds.io.readers) shares: the `Reader` record, `TDSError`, small helpers.

A reader turns one file format into plain fields (a dict), so that `TDSData.read` builds and checks the data in
one place and the readers import nothing above them. Its fields: `hkl` (N, 3) r.l.u. and `intensity` (N,), and
optionally `sigma` (N,), `mask` (N,), `temperature` (K), `units` (str), `cell` (3, 3) Å (the cell the hkl index,
when the file stores it) and `provenance` (dict); a field the file does not hold may be left out or None.
A reader of points only (hkl to simulate at, `points_only=True`) returns just `hkl`, checked with `check_hkl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


class TDSError(ValueError):
    """Data that cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Reader:
    """One file format of the reader table.

    Attributes:
        name: the format's short name, e.g. "hdf5" or "nexus".
        can_read: can_read(path) → bool, a cheap look at the file (its first bytes, its top-level names, or its
            suffix); it may raise TDSError for a file of this format that cannot be read at all.
        read: read(path) → dict of fields (module docstring); a volume reader takes read(path, bin=K).
        volume: True when `read` averages K×K×K voxels into one point given bin=K (`TDSData.read(..., bin=K)`).
        points_only: True for a list of points without intensities (e.g. `ase-tds simulate --hkl FILE`), which
            `TDSData.read` does not take.
    """

    name: str
    can_read: Callable[[Path], bool]
    read: Callable[..., dict]
    volume: bool = False
    points_only: bool = False


def text(value) -> str | None:
    """An HDF5/npz attribute as str (bytes decoded; a 1-element array unwrapped), or None."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def check_hkl(hkl, path: Path) -> np.ndarray:
    """`hkl` as a float array (N, 3), N ≥ 1, finite; else TDSError naming `path` and the fix."""
    try:
        hkl = np.asarray(hkl, dtype=float)
    except (TypeError, ValueError) as err:
        raise TDSError(f"{path}: not a table of numbers ({err}); give one 'h k l' row per point") from None
    if hkl.ndim != 2 or hkl.shape[1] != 3 or len(hkl) == 0:
        raise TDSError(f"{path}: hkl has shape {hkl.shape}; give N ≥ 1 rows of three numbers h k l, shape (N, 3)")
    if not np.isfinite(hkl).all():
        raise TDSError(f"{path}: hkl has NaN/inf values; give N ≥ 1 rows of three finite numbers h k l")
    return hkl
