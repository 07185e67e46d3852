"""phonopy files in: a phonopy.Phonopy with force constants from a file or folder (`load_phonopy`), and its force
constants less their dipole–dipole part where phonopy has Born charges (`short_range_force_constants`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

def short_range_force_constants(ph, primitive) -> np.ndarray:
    """phonopy's force constants (compact or full, eV/Å²) less their dipole–dipole part where phonopy has Born
    charges (`nac_params`): the short-range force constants whose D(q) plus D_dd(q) is phonopy's D(q).

    Args:
        ph (phonopy.Phonopy): with force constants.
        primitive (ase.Atoms): the primitive cell the charges are ordered by.

    Returns:
        Φ − Φ_dd in phonopy's layout, eV/Å².
    """
    fc = np.asarray(ph.force_constants, dtype=float)
    if ph.nac_params is None:
        return fc
    from .dipole import BornCharges, dipole_force_constants

    born = BornCharges.from_phonopy_born(ph, primitive)
    layout = "compact" if fc.shape[0] != fc.shape[1] else "full"
    with torch.no_grad():
        return fc - dipole_force_constants(ph, primitive, born, layout).cpu().numpy()


def load_phonopy(source):
    """A phonopy.Phonopy with force constants: `source` is one already, a phonopy.load-able yaml, or a folder
    holding phonopy_params.yaml (what `ase-tds fit` writes).

    Force constants are read as stored, or produced from forces when the file holds only those.
    Bare FORCE_CONSTANTS / force_constants.hdf5 files are refused: they lack the crystal structure.

    Args:
        source (phonopy.Phonopy | str | Path): phonopy.Phonopy, a phonopy.load-able yaml, or a folder holding
            phonopy_params.yaml.

    Returns:
        (phonopy.Phonopy): with force constants (eV/Å²).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a bare force-constants file, an unreadable file, or no force constants nor forces.
    """
    if isinstance(source, (str, Path)):
        import phonopy

        path = Path(source)
        if path.is_dir():
            path = path / "phonopy_params.yaml"
        if not path.exists():
            raise FileNotFoundError(f"no phonopy file at {path}: give a phonopy.load-able yaml or a folder "
                                    "holding phonopy_params.yaml")
        if _is_data_file(path):
            raise ValueError(f"{path} is a TDS data file (hkl and intensities), not force constants; give a "
                             "phonopy.load-able yaml (phonopy_params.yaml) or a folder holding one")
        if path.name.startswith("FORCE_CONSTANTS") or path.suffix in (".hdf5", ".h5"):
            raise ValueError(f"{path} holds force constants without the crystal structure they belong to; "
                             "pass the phonopy_params.yaml written next to it (structure and force constants in one file)")
        try:  # nac_params only from the file itself, never a BORN that happens to lie in the working directory
            from phonopy.interface.phonopy_yaml import read_phonopy_yaml

            source = phonopy.load(path, log_level=0, is_nac=False)
            source.nac_params = read_phonopy_yaml(path).nac_params  # the file's own `nac:` block, or None
        except Exception as err:  # phonopy reports unreadable files in many ways
            raise ValueError(f"phonopy could not read {path} ({type(err).__name__}: {err}); "
                             "expected a phonopy.yaml-like file such as phonopy_params.yaml") from err
    if getattr(source, "force_constants", None) is None:
        raise ValueError("the phonopy data hold no force constants (nor forces to produce them); produce them "
                         "first (ph.produce_force_constants()) or save with Phonopy.save(settings={'force_constants': True})")
    return source


def _is_data_file(path: Path) -> bool:
    """Whether `path` is a TDS data file (an HDF5/NeXus point list or volume, or an .npz with hkl or intensities)."""
    if path.suffix == ".npz":
        try:
            with np.load(path) as archive:
                return bool({"hkl", "intensity"} & set(archive.files))
        except (OSError, ValueError):
            return False
    if path.suffix not in (".h5", ".hdf5", ".nxs", ".nx5"):
        return False
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            found = []
            handle.visit(lambda name: found.append(name.rsplit("/", 1)[-1]) and None)
    except OSError:
        return False
    return bool({"hkl", "intensity", "data"} & set(found)) and "force_constants" not in found
