"""Phonopy files in and out: phonopy_params.yaml, FORCE_CONSTANTS and force_constants.hdf5.

Units are phonopy's defaults (VASP mode): Å, amu, eV/Å² for force constants, THz for frequencies.
Force-constant arrays are compact, (n_p, N, 3, 3): rows are the primitive-cell atoms (phonopy's
`primitive.p2s_map`), columns all N atoms of phonopy's supercell in its own order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from phonopy.file_IO import write_force_constants_to_hdf5, write_FORCE_CONSTANTS

from ..atomic import write_files
from ..phonopy_load import load_phonopy as read_force_constants  # noqa: F401  (the one loader, re-exported)
from ..structure import diagonal_supercell_for

PARAMS_FILE = "phonopy_params.yaml"


def write_phonopy_files(model, folder, supercell_matrix=None) -> dict[str, Path]:
    """Write a ForceConstantModel's force constants into `folder` (created if needed) for phonopy.

    - phonopy_params.yaml: structure, supercell and primitive matrices and the compact force constants;
      read it with `phonopy.load(path, produce_fc=False)` or the command line (`phonopy phonopy_params.yaml ...`).
    - FORCE_CONSTANTS (text) and force_constants.hdf5: the same compact array on its own.

    All files are first written under temporary names in `folder` and renamed only once every one is
    complete: an error leaves no new or half-written file behind.

    Args:
        model (ForceConstantModel): ForceConstantModel; its θ (eV/Å²) at the call is written.
        folder (str | Path): the output folder, created if needed; existing files of these names are replaced.
        supercell_matrix (array_like | None): (3, 3) or (3,) int relative to `model.unitcell`; None = the smallest
            diagonal multiple holding the model's cutoff.

    Returns:
        {file name: path} of phonopy_params.yaml, FORCE_CONSTANTS and force_constants.hdf5.

    Raises:
        StructureError: a supercell too small for the model's cutoff.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writers = phonopy_writers(model, supercell_matrix)
    write_files(folder, writers)
    return {name: folder / name for name in writers}


def phonopy_writers(model, supercell_matrix=None) -> dict:
    """{file name: write(path)} of the phonopy files of `write_phonopy_files`, for a caller that writes them
    together with other files (all or nothing, `ase_tds.atomic.write_files`).

    Args:
        model (ForceConstantModel): its θ (eV/Å²) at the call is written.
        supercell_matrix (array_like | None): as for `write_phonopy_files`.

    Returns:
        {"phonopy_params.yaml" | "FORCE_CONSTANTS" | "force_constants.hdf5": a function of the path to write}.

    Raises:
        StructureError: a supercell too small for the model's cutoff.
    """
    if supercell_matrix is None:
        supercell_matrix = diagonal_supercell_for(np.array(model.unitcell.cell[:]), model.cutoff)
    ph = model.to_phonopy(supercell_matrix)
    fc, p2s_map = ph.force_constants, ph.primitive.p2s_map
    return {
        PARAMS_FILE: lambda path: ph.save(str(path), settings={"force_constants": True}),
        "FORCE_CONSTANTS": lambda path: write_FORCE_CONSTANTS(fc, filename=str(path), p2s_map=p2s_map),
        "force_constants.hdf5": lambda path: write_force_constants_to_hdf5(
            fc, filename=str(path), p2s_map=p2s_map, physical_unit="eV/angstrom^2"),
    }
