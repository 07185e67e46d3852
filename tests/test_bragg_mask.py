"""Bragg masking: the allowed reflections of the structure factor against the textbook extinction rules, the mask in
r.l.u. and Å⁻¹ against brute-force distances, and the warning for Bragg peaks left in the data."""

import warnings

import numpy as np
import pytest
from ase.build import bulk

from ase_tds import TDSData
from ase_tds.bragg import allowed
from ase_tds.cli import main
from ase_tds.io.base import TDSError
from ase_tds.structure import reciprocal_q

from conftest import NI_A, ni_conventional

BOX = np.stack(np.meshgrid(*3 * [np.arange(-5, 6)], indexing="ij"), axis=-1).reshape(-1, 3)


def fcc_rule(hkl):
    """Face-centred lattice: h, k, l all even or all odd."""
    return np.all(hkl % 2 == 0, axis=1) | np.all(hkl % 2 == 1, axis=1)


def diamond_rule(hkl):
    """Diamond: all odd, or all even with h + k + l divisible by 4."""
    return np.all(hkl % 2 == 1, axis=1) | (np.all(hkl % 2 == 0, axis=1) & (hkl.sum(axis=1) % 4 == 0))


def silicon():
    return bulk("Si", "diamond", a=5.43, cubic=True)


@pytest.mark.parametrize("structure, rule", [
    (ni_conventional(), fcc_rule), (silicon(), diamond_rule), (bulk("NaCl", "rocksalt", a=5.64, cubic=True), fcc_rule),
])
def test_allowed_reflections_follow_the_extinction_rules(structure, rule):
    np.testing.assert_array_equal(allowed(structure, BOX), rule(BOX))


@pytest.mark.parametrize("radius, units", [(0.3, "rlu"), (0.4, "invA")])
def test_the_mask_is_the_brute_force_neighbourhood_of_the_allowed_reflections(radius, units):
    hkl = np.random.default_rng(0).uniform(-3, 3, (3000, 3))
    data = TDSData.from_hkl(hkl, np.ones(len(hkl)), silicon())
    reflections = BOX[diamond_rule(BOX)]
    distance = (lambda x: x) if units == "rlu" else (lambda x: reciprocal_q(x, silicon().cell[:]))
    nearest = np.linalg.norm(distance(hkl)[:, None, :] - distance(reflections)[None, :, :], axis=2).min(axis=1)
    masked = data.mask_bragg(radius, structure=silicon(), units=units)
    np.testing.assert_array_equal(masked.mask, nearest > radius)
    assert 0 < masked.n_used < len(data)
    primitive = bulk("Si", "diamond", a=5.43)  # the same crystal in its primitive cell, same Cartesian frame
    np.testing.assert_array_equal(data.mask_bragg(radius, structure=primitive, units=units).mask, masked.mask)


def test_fcc_structure_and_primitive_cell_mask_alike():
    hkl = np.random.default_rng(1).uniform(-3, 3, (2000, 3))
    data = TDSData.from_hkl(hkl, np.ones(len(hkl)), ni_conventional())
    np.testing.assert_array_equal(data.mask_bragg(0.2, structure=ni_conventional()).mask,
                                  data.mask_bragg(0.2, bulk("Ni", "fcc", a=NI_A).cell).mask)


def test_an_extinct_reflection_keeps_its_neighbourhood_but_not_its_point():
    """Diamond (2 0 0) has no peak: a point 0.05 from it stays, the point on it (where the diffuse model is not
    defined) goes with any radius > 0; (2 2 0) is allowed."""
    data = TDSData.from_hkl([[2, 0, 0], [2.05, 0, 0], [2, 2, 0.05], [0.5, 0.5, 0.5]], np.ones(4), silicon())
    np.testing.assert_array_equal(data.mask_bragg(0.1, structure=silicon()).mask, [False, True, False, True])
    assert data.mask_bragg(0, structure=silicon()).n_used == 4


def test_bad_mask_arguments_are_refused():
    data = TDSData.from_hkl([[0.5, 0.5, 0.5]], [1.0], ni_conventional())
    with pytest.raises(TDSError, match="field 'units' is 'A'"):
        data.mask_bragg(0.1, structure=ni_conventional(), units="A")
    with pytest.raises(TDSError, match="field 'radius' is -0.1"):
        data.mask_bragg(-0.1, structure=ni_conventional())
    with pytest.raises(TDSError, match="field 'primitive_cell' is given with a structure"):
        data.mask_bragg(0.1, ni_conventional().cell, structure=ni_conventional())
    with pytest.raises(TDSError, match="field 'structure' does not span the lattice of cell"):
        data.mask_bragg(0.1, structure=bulk("Ni", "fcc", a=3.0))


def peak_data(spike: float):
    """A grid around Ni (2 0 0) of diffuse intensity 1 + 0.01/(d² + 10⁻⁴) (its 1/d² rise), with `spike` added on the
    voxel at the reflection."""
    axis = np.arange(-7, 8) * 0.04
    hkl = np.stack(np.meshgrid(2 + axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    d = np.linalg.norm(hkl - [2, 0, 0], axis=1)
    intensity = 1 + 0.01 / (d**2 + 1e-4) + spike * (d < 1e-9)
    return TDSData.from_hkl(hkl, intensity, ni_conventional(), source="peaks.h5")


def test_bragg_peaks_left_in_are_named_with_the_option():
    with pytest.warns(UserWarning, match=r"peaks.h5: used points next to 1 Bragg reflection \(2 0 0\) .*--mask-bragg"):
        peak_data(1e6).mask_bragg(0, structure=ni_conventional())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peak_data(1e6).mask_bragg(0.1, structure=ni_conventional())  # masked: nothing left to warn about
        peak_data(0.0).mask_bragg(0, structure=ni_conventional())  # the diffuse rise alone is no peak


@pytest.mark.parametrize("value", ["0.1x", "-0.2", "invA"])
def test_a_bad_mask_bragg_option_is_refused_before_any_work(tmp_path, capsys, value):
    code = main(["fit", str(tmp_path / "Ni.cif"), str(tmp_path / "data.h5"), "--out", str(tmp_path / "fit"),
                 "--mask-bragg", value])
    assert code == 2
    assert f"--mask-bragg {value}: give a radius ≥ 0 in r.l.u. (e.g. 0.1), or in Å⁻¹ with the suffix invA" in \
        capsys.readouterr().err
