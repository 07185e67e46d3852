"""Phonopy files in and out: phonopy_params.yaml, FORCE_CONSTANTS and force_constants.hdf5.

Units are phonopy's defaults (VASP mode): Å, amu, eV/Å² for force constants, THz for frequencies.
Force-constant arrays are compact, (n_p, N, 3, 3): rows are the primitive-cell atoms (phonopy's
`primitive.p2s_map`), columns all N atoms of phonopy's supercell in its own order.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import phonopy
from phonopy.file_IO import write_force_constants_to_hdf5, write_FORCE_CONSTANTS

from ..structure import diagonal_supercell_for

PARAMS_FILE = "phonopy_params.yaml"


def write_phonopy_files(model, folder, supercell_matrix=None) -> dict[str, Path]:
    """Write a ForceConstantModel's force constants into `folder` (created if needed) for phonopy.

    - phonopy_params.yaml: structure, supercell and primitive matrices and the compact force constants;
      read it with `phonopy.load(path, produce_fc=False)` or the command line (`phonopy phonopy_params.yaml ...`).
    - FORCE_CONSTANTS (text) and force_constants.hdf5: the same compact array on its own.

    supercell_matrix: (3, 3) or (3,) int relative to `model.unitcell`; default the smallest diagonal
    multiple holding the model's cutoff. All files are first written under temporary names in `folder`
    and renamed only once every one is complete: an error leaves no new or half-written file behind.
    Returns {file name: path}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if supercell_matrix is None:
        supercell_matrix = diagonal_supercell_for(np.array(model.unitcell.cell[:]), model.cutoff)
    ph = model.to_phonopy(supercell_matrix)
    fc, p2s_map = ph.force_constants, ph.primitive.p2s_map
    writers = {
        PARAMS_FILE: lambda path: ph.save(path, settings={"force_constants": True}),
        "FORCE_CONSTANTS": lambda path: write_FORCE_CONSTANTS(fc, filename=path, p2s_map=p2s_map),
        "force_constants.hdf5": lambda path: write_force_constants_to_hdf5(
            fc, filename=path, p2s_map=p2s_map, physical_unit="eV/angstrom^2"),
    }
    partial = {}
    try:
        for name, write in writers.items():
            handle, partial[name] = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
            os.close(handle)
            write(partial[name])
        for name, path in partial.items():
            os.replace(path, folder / name)
    finally:
        for path in partial.values():
            if os.path.exists(path):
                os.remove(path)
    return {name: folder / name for name in writers}


def read_force_constants(path) -> phonopy.Phonopy:
    """A phonopy.Phonopy with force constants from a phonopy.load-able yaml (or a folder holding phonopy_params.yaml).

    Force constants are read as stored, or produced from forces when the file holds only those.
    Bare FORCE_CONSTANTS / force_constants.hdf5 files are refused: they lack the crystal structure.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PARAMS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no phonopy file at {path}")
    if path.name.startswith("FORCE_CONSTANTS") or path.suffix in (".hdf5", ".h5"):
        raise ValueError(f"{path} holds force constants without the crystal structure they belong to; "
                         f"pass the {PARAMS_FILE} written next to it (structure and force constants in one file)")
    try:
        ph = phonopy.load(path, log_level=0)
    except Exception as err:  # phonopy reports unreadable files in many ways
        raise ValueError(f"phonopy could not read {path} ({type(err).__name__}: {err}); "
                         f"expected a phonopy.yaml-like file such as {PARAMS_FILE}") from err
    if ph.force_constants is None:
        raise ValueError(f"{path} holds neither force constants nor forces to produce them; "
                         f"write it with Phonopy.save(settings={{'force_constants': True}})")
    return ph
