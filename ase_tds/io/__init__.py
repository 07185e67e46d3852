"""File formats in and out of ase_tds: the reader table (readers.py, one module per format) and phonopy files."""

from .base import Reader, TDSError
from .phonopy import read_force_constants, write_phonopy_files
from .readers import READERS, reader_for, register

__all__ = ["READERS", "Reader", "TDSError", "read_force_constants", "reader_for", "register", "write_phonopy_files"]
