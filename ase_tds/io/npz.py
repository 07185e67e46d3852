"""`.npz` point lists (docs/data-format.md): arrays `hkl`, `intensity`, optional `sigma`, `mask`, `temperature`,
`units`, `cell`. Recognised by content (a zip archive), not by the file's name."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .base import Reader, TDSError


def read_npz(path: Path) -> dict:
    """The fields (ase_tds.io.base) of an .npz point list; TDSError when `hkl` or `intensity` is missing."""
    with np.load(path, allow_pickle=False) as z:
        for name in ("hkl", "intensity"):
            if name not in z:
                raise TDSError(f"{path}: no array '{name}'; an .npz point list needs 'hkl' (N, 3) and "
                               "'intensity' (N,) (docs/data-format.md)")

        def optional(name):
            return z[name] if name in z else None

        units = optional("units")
        return dict(hkl=z["hkl"], intensity=z["intensity"], sigma=optional("sigma"), mask=optional("mask"),
                    temperature=optional("temperature"), units=None if units is None else str(units[()]),
                    cell=optional("cell"))


READER = Reader("npz", zipfile.is_zipfile, read_npz)
