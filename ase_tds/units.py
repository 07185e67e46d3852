"""Every physical constant and unit conversion of ase_tds, once, taken from ASE and phonopy.

The package works in Å, eV, amu and K; frequencies are in THz (phonopy's), |Q| in Å⁻¹ and photon
energies in keV. Force constants are eV/Å², so eigenvalues λ of the dynamical matrix are eV/Å²/amu.

Sources (each value as ase_tds has always used it):
- k_B and ħ: `ase.units` (ASE's default CODATA set, 2014), as ASE's own thermostats and phonons use them;
- the THz factor: phonopy's (`get_physical_units().DefaultToTHz`), so that frequencies equal phonopy's;
- hc and m_ec² (the Compton recoil): CODATA 2018 through `ase.units.create_units("2018")`.
ASE's and phonopy's constants differ from the 7th digit (THz factor 1.3e-7, k_B 9e-7 relative), far below
any measured quantity here.
"""

from __future__ import annotations

import numpy as np
from ase import units as _ase
from ase.units import create_units

try:  # phonopy ≥ 2.39; before it the same factor was phonopy.units.VaspToTHz
    from phonopy.physical_units import get_physical_units as _phonopy_units
except ImportError:  # pragma: no cover - older phonopy
    from phonopy.units import VaspToTHz as _THZ
else:
    _THZ = _phonopy_units().DefaultToTHz

# Boltzmann constant k_B, eV/K
KB = _ase.kB

# ħω in eV for ω² = 1 eV/Å²/amu: ħ·√(e / (1e-20 m² · amu)) / e
HBAR_OMEGA_UNIT = _ase._hbar * np.sqrt(_ase._e / (1e-20 * _ase._amu)) / _ase._e

# ν (THz) = √λ · THZ_PER_SQRT_EV_A2_AMU for λ in eV/Å²/amu (the 1/2π folded in): phonopy's VaspToTHz
THZ_PER_SQRT_EV_A2_AMU = float(_THZ)

_CODATA_2018 = create_units("2018")
# hc, keV·Å (12.398 keV·Å: the photon energy of a 1 Å wavelength)
HC_KEV_A = _CODATA_2018["_hplanck"] * _CODATA_2018["_c"] / _CODATA_2018["_e"] * 1e7
# the electron's rest energy m_ec², keV
ELECTRON_REST_ENERGY_KEV = _CODATA_2018["_me"] * _CODATA_2018["_c"] ** 2 / _CODATA_2018["_e"] * 1e-3
# (hc)²/(8π² m_ec²), keV·Å²: the Compton shift E − E' ≈ this · |Q|² for |Q| in Å⁻¹ (0.00381 keV·Å²)
RECOIL_KEV_A2 = HC_KEV_A**2 / (8 * np.pi**2 * ELECTRON_REST_ENERGY_KEV)
