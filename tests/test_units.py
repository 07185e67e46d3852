"""Each constant and each check said once: units (from ASE and phonopy), the stability threshold, the
lattice-integer check, the temperature rule, and the guarded ASE plug-in entry point."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import units as ase_units
from ase.build import bulk
from ase.units import create_units
from phonopy.physical_units import get_physical_units

from ase_tds import ForceConstantModel, StructureError, units
from ase_tds.covariance import UNSTABLE_THZ, check_temperature, lowest_frequency, unstable_modes
from ase_tds.structure import EXACT_LATTICE_TOL, LATTICE_TOL, integer_matrix

PACKAGE = Path(__file__).resolve().parents[1] / "ase_tds"


# ---- units ----------------------------------------------------------------------------------------------------

def test_units_are_ase_and_phonopy_values():
    assert units.KB == ase_units.kB
    # ħω (eV) for ω² = 1 eV/Å²/amu, from ASE's SI constants
    hbar_omega = ase_units._hbar * np.sqrt(ase_units._e / (1e-20 * ase_units._amu)) / ase_units._e
    assert units.HBAR_OMEGA_UNIT == pytest.approx(hbar_omega, rel=1e-15)
    assert units.THZ_PER_SQRT_EV_A2_AMU == get_physical_units().DefaultToTHz
    codata = create_units("2018")
    assert units.HC_KEV_A == pytest.approx(codata["_hplanck"] * codata["_c"] / codata["_e"] * 1e7, rel=1e-15)
    assert units.ELECTRON_REST_ENERGY_KEV == pytest.approx(codata["_me"] * codata["_c"] ** 2 / codata["_e"] / 1e3,
                                                           rel=1e-15)


def test_units_keep_the_values_the_package_used():
    """The literals units.py replaced: phonopy's VaspToTHz, CODATA 2018's hc and m_ec² (the latter as
    recommended, 510.99895 keV, differs from ASE's m_e·c² by 7.5e-12 relative: the recoil by as much)."""
    assert units.THZ_PER_SQRT_EV_A2_AMU == 15.633302300230191
    assert units.HC_KEV_A == 12.398419843320026
    assert units.RECOIL_KEV_A2 == pytest.approx(12.398419843320026**2 / (8 * np.pi**2 * 510.99895), rel=1e-11)
    # the two sets of constants agree to their CODATA difference: ħω = h·ν with ν from the THz factor
    thz_to_ev = get_physical_units().THzToEv
    assert units.HBAR_OMEGA_UNIT == pytest.approx(thz_to_ev * units.THZ_PER_SQRT_EV_A2_AMU, rel=1e-6)


def test_no_constant_is_said_twice():
    """No module but units.py holds a copy of a constant or builds one from ase.units."""
    pattern = re.compile(r"15\.6333|12\.3984|510\.99|8\.6173|1\.0545|6\.62607|1\.66053|units\._|units\.kB|VaspToTHz")
    found = [f"{path.relative_to(PACKAGE)}:{i}" for path in PACKAGE.rglob("*.py") if path.name != "units.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line.split("#")[0])]
    assert found == []


# ---- stability --------------------------------------------------------------------------------------------------

def test_unstable_modes_is_the_one_threshold():
    freqs = np.array([-2 * UNSTABLE_THZ, -0.5 * UNSTABLE_THZ, 0.0, 3.0])
    np.testing.assert_array_equal(unstable_modes(freqs), [True, False, False, False])
    np.testing.assert_array_equal(unstable_modes(torch.as_tensor(freqs)), [True, False, False, False])
    assert unstable_modes(-1.0) and not unstable_modes(-1e-4)
    assert unstable_modes(freqs.reshape(2, 2)).shape == (2, 2)


def test_lowest_frequency_tells_stable_from_unstable():
    model = ForceConstantModel(bulk("Ni", "fcc", a=3.52), shells=2).set_from_springs(300.0)
    lowest = lowest_frequency(model)
    assert lowest > 0 and not unstable_modes(lowest)
    model.set_parameters(-model.theta.detach().numpy())
    assert unstable_modes(lowest_frequency(model))


# ---- the lattice-integer check ----------------------------------------------------------------------------------

def test_integer_matrix_of_a_conventional_cell():
    conventional, primitive = bulk("Ni", "fcc", a=3.52, cubic=True).cell, bulk("Ni", "fcc", a=3.52).cell
    matrix = integer_matrix(conventional, primitive, "unused")
    assert matrix.dtype.kind == "i" and round(abs(np.linalg.det(matrix))) == 4
    np.testing.assert_allclose(matrix @ primitive[:], conventional[:], atol=1e-12)
    np.testing.assert_array_equal(integer_matrix(4 * primitive[:], primitive, "unused"), 4 * np.eye(3))


def test_integer_matrix_refuses_with_what_and_hint():
    primitive = bulk("Ni", "fcc", a=3.52).cell[:]
    rotated = primitive @ np.array([[0.8, -0.6, 0], [0.6, 0.8, 0], [0, 0, 1]])
    with pytest.raises(StructureError, match=r"^x\.cif: not Ni: cell · inv\(primitive cell\) = \[\[.*\]\] is not an "
                                             r"integer matrix \(off by .*\); give the Ni cell$"):
        integer_matrix(rotated, primitive, "x.cif: not Ni", "give the Ni cell")
    with pytest.raises(StructureError, match=r"^cell · inv\(primitive cell\).*not an integer matrix"):
        integer_matrix(primitive * 1.5, primitive, "")
    with pytest.raises(StructureError, match="not an integer matrix"):
        integer_matrix(np.full((3, 3), np.nan), primitive, "nan")


def test_integer_matrix_tolerances():
    primitive = bulk("Ni", "fcc", a=3.52).cell[:]
    strained = 4 * primitive * (1 + 1e-5)  # entries 4.00004: one lattice from two sources, not the exact cell
    integer_matrix(strained, primitive, "two sources")
    assert LATTICE_TOL > EXACT_LATTICE_TOL
    with pytest.raises(StructureError, match="more than 1e-05"):
        integer_matrix(strained, primitive, "exact", tol=EXACT_LATTICE_TOL)


# ---- temperature ------------------------------------------------------------------------------------------------

def test_one_temperature_rule():
    check_temperature(300.0, "classical")
    check_temperature(0.0, "quantum")  # zero-point motion
    check_temperature(1e-3, None)
    for temperature, statistics in [(0.0, "classical"), (0.0, None), (-1.0, "quantum"), (np.nan, "quantum"),
                                    (np.inf, None)]:
        with pytest.raises(ValueError, match="temperature must be > 0 K"):
            check_temperature(temperature, statistics)


def test_a_measurement_is_never_at_zero_kelvin():
    from ase_tds import TDSData, TDSError

    cell = bulk("Ni", "fcc", a=3.52, cubic=True).cell
    with pytest.raises(TDSError, match="field 'temperature' is 0.0 K; give a positive temperature"):
        TDSData.from_hkl([[0.5, 0, 0]], [1.0], cell, temperature=0)
    assert TDSData.from_hkl([[0.5, 0, 0]], [1.0], cell, temperature=300).temperature == 300.0


# ---- ASE's private plug-in package ------------------------------------------------------------------------------

def _plugins_in_a_fresh_process(setup: str) -> list:
    """`import ase_tds.calculator` in a new Python after `setup` (which breaks ase._4), and its plug-in list: a fresh
    process, so that no second copy of the package's classes lingers in this one."""
    code = (f"import sys, types\n{setup}\nimport ase_tds, ase_tds.calculator as c\n"
            "assert c.TDSFitted.implemented_properties == ['energy', 'free_energy', 'forces']\n"
            "print(sorted(c.__ase_plugins__))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip().splitlines()[-1])


def test_import_without_ase_4():
    """A missing (or moved) ase._4 leaves the plug-in list empty and `import ase_tds` working."""
    assert _plugins_in_a_fresh_process("sys.modules['ase._4'] = None  # ImportError on import") == []


def test_import_with_a_changed_ase_4_api():
    """An ase._4 whose CalculatorPlugin takes other arguments does not break the import either."""
    setup = ("def changed(*args, **kwargs):\n    raise TypeError('unexpected keyword argument citation')\n"
             "fake = types.ModuleType('ase._4.plugins.plugin')\nfake.CalculatorPlugin = changed\n"
             "for name in ('ase._4', 'ase._4.plugins'):\n    sys.modules[name] = types.ModuleType(name)\n"
             "sys.modules['ase._4.plugins.plugin'] = fake")
    assert _plugins_in_a_fresh_process(setup) == []
