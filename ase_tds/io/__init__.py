"""File formats in and out of ase_tds."""

from .phonopy import read_force_constants, write_phonopy_files

__all__ = ["read_force_constants", "write_phonopy_files"]
