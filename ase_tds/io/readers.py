"""The reader table: every file format ase_tds reads data or points from, one `Reader` each, tried in order.

`TDSData.read` takes the first data reader whose `can_read(path)` is true; `ase-tds simulate --hkl FILE` takes the
first reader of any kind (a data file gives its hkl, a list of points its points). Adding a format is one new
module in ase_tds/io that defines a `Reader` (ase_tds.io.base) and one entry in READERS below; from outside the
package, `register(reader)`.
"""

from __future__ import annotations

from pathlib import Path

from . import hdf5, hkl_text, nexus, npz, nxrefine
from .base import Reader, TDSError

READERS: list[Reader] = [
    npz.READER,  # a zip archive
    hdf5.HKL_LIST,  # HDF5 with `hkl` and no `intensity`: points only
    hdf5.POINT_LIST,  # HDF5 with `hkl` or `intensity` at the root
    nxrefine.READER,  # HDF5 with an NXentry holding NXRefine's transform or masked_transform
    nexus.READER,  # any other HDF5: its NXdata volume
    hkl_text.READER,  # anything else: a text table of points (last: it takes every other file)
]


def register(reader: Reader) -> None:
    """Add `reader` to the table, tried before the others; a reader of the same name is replaced.

    Args:
        reader: the format (its name, can_read and read).
    """
    READERS[:] = [reader] + [r for r in READERS if r.name != reader.name]


def reader_for(path, points_only: bool = False) -> Reader:
    """The first reader of the table that reads the file at `path`.

    Args:
        path (str | Path): an existing file.
        points_only: also take readers of points without intensities (hkl to simulate at); False = data only.

    Returns:
        The reader.

    Raises:
        TDSError: no reader takes the file, or it is an HDF5 file that cannot be read (truncated, corrupt).
    """
    path = Path(path)
    for reader in READERS:
        if (points_only or not reader.points_only) and reader.can_read(path):
            return reader
    raise TDSError(f"{path}: neither HDF5 nor .npz; write the data as an HDF5 point list "
                   "(datasets hkl, intensity, sigma, mask; attribute temperature — docs/data-format.md)")
