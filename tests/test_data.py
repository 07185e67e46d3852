"""TDSData: files in and out, validation messages, Bragg/window/slice selections, Poisson noise."""

import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from ase_tds.data import TDSData, TDSError, add_poisson_noise

A_NI = 3.52


@pytest.fixture
def ni():
    return bulk("Ni", "fcc", a=A_NI, cubic=True)


@pytest.fixture
def triclinic():
    return Atoms("Si", cell=[[4.1, 0.0, 0.0], [0.7, 5.2, 0.0], [-0.4, 0.9, 6.3]], pbc=True)


def random_data(atoms, n=50, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    hkl = rng.uniform(-4, 4, size=(n, 3))
    return TDSData.from_hkl(hkl, rng.uniform(0.5, 2.0, n), atoms.cell, sigma=rng.uniform(0.01, 0.1, n),
                            mask=rng.random(n) > 0.2, **kwargs)


def assert_same(a: TDSData, b: TDSData):
    np.testing.assert_allclose(a.hkl, b.hkl)
    np.testing.assert_allclose(a.q, b.q)
    np.testing.assert_allclose(a.intensity, b.intensity)
    np.testing.assert_allclose(a.sigma, b.sigma)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.temperature == b.temperature and a.units == b.units


# ---- Q convention and round trips ------------------------------------------------------------------


def test_q_from_hkl_matches_ase_reciprocal_cell(triclinic):
    data = random_data(triclinic)
    expected = 2 * np.pi * data.hkl @ triclinic.cell.reciprocal()
    np.testing.assert_allclose(data.q, expected, rtol=1e-12)
    np.testing.assert_allclose(data.q_norm, np.linalg.norm(expected, axis=1), rtol=1e-12)
    back = TDSData.from_q(data.q, data.intensity, cell=triclinic.cell)
    np.testing.assert_allclose(back.hkl, data.hkl, atol=1e-12)


def test_point_list_round_trip(tmp_path, triclinic):
    data = random_data(triclinic, temperature=295.0, units="e.u./atom")
    path = tmp_path / "points.h5"
    data.write(path)
    with h5py.File(path, "r") as f:  # the docs/data-format.md contract, as another program would read it
        assert f["hkl"].shape == (50, 3) and f["mask"].dtype == bool
        assert f.attrs["temperature"] == 295.0 and f.attrs["units"] == "e.u./atom"
    back = TDSData.read(path, structure=triclinic)
    assert_same(back, data)
    assert back.absolute and back.n_used == data.n_used and str(path) == back.source
    assert_same(TDSData.read(path), data)  # the stored cell stands in for a missing structure
    assert list(tmp_path.iterdir()) == [path]


def test_point_list_minimal_file_from_another_program(tmp_path, ni):
    path = tmp_path / "minimal.h5"
    with h5py.File(path, "w") as f:
        f["hkl"] = [[0.5, 0.0, 0.0], [1.5, 0.5, 0.0]]
        f["intensity"] = [1.0, 2.0]
        f["counts_raw"] = [10, 20]  # other datasets are ignored
        f.attrs["temperature"] = 300
        f.attrs["units"] = np.bytes_(b"arb.")
    data = TDSData.read(path, structure=ni)
    assert data.sigma is None and data.mask.all() and data.units == "arb." and not data.absolute
    assert data.require_temperature() == 300.0
    assert TDSData.read(path, structure=ni, temperature=10.0).temperature == 10.0
    np.testing.assert_allclose(data.q[1], 2 * np.pi / A_NI * np.array([1.5, 0.5, 0.0]))


def test_npz_round_trip(tmp_path, ni):
    data = random_data(ni, temperature=80.0, units="arb.")
    path = tmp_path / "points.npz"
    np.savez(path, hkl=data.hkl, intensity=data.intensity, sigma=data.sigma, mask=data.mask,
             temperature=80.0, units="arb.")
    assert_same(TDSData.read(path, structure=ni), data)


def write_nxdata(path, old_style=False, with_errors=True):
    """A 4×3×2 H, K, L volume with a NaN gap at (1, 2, 0), temperature on entry/sample."""
    h, k, l = np.linspace(-1, 1, 4), np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.1])
    intensity = np.arange(24, dtype=float).reshape(4, 3, 2) + 1.0
    intensity[1, 2, 0] = np.nan
    with h5py.File(path, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.create_group("sample").attrs["temperature"] = 150.0
        group = entry.create_group("diffuse")
        group.attrs["NX_class"] = "NXdata"
        group["H"], group["K"], group["L"] = h, k, l
        group["data"] = intensity
        if old_style:
            group["data"].attrs["signal"] = 1
            group["data"].attrs["axes"] = "H:K:L"
        else:
            group.attrs["signal"] = "data"
            group.attrs["axes"] = ["H", "K", "L"]
        if with_errors:
            group["errors"] = np.sqrt(np.nan_to_num(intensity, nan=1.0))
    return (h, k, l), intensity


@pytest.mark.parametrize("old_style", [False, True])
def test_nxdata_volume_with_gap(tmp_path, ni, old_style):
    path = tmp_path / "volume.nxs"
    (h, k, l), intensity = write_nxdata(path, old_style=old_style)
    data = TDSData.read(path, structure=ni)
    assert len(data) == 23 and data.n_used == 23 and data.temperature == 150.0  # the gap voxel is not kept
    expected_hkl = np.stack(np.meshgrid(h, k, l, indexing="ij"), axis=-1).reshape(-1, 3)
    measured = np.isfinite(intensity.ravel())
    np.testing.assert_allclose(data.hkl, expected_hkl[measured])
    assert not np.any(np.all(np.isclose(data.hkl, [h[1], k[2], l[0]]), axis=1))
    np.testing.assert_allclose(data.intensity, intensity.ravel()[measured])
    np.testing.assert_allclose(data.sigma, np.sqrt(intensity.ravel()[measured]))


def test_nxdata_bin_averages_voxels_with_their_errors(tmp_path, ni, monkeypatch):
    """bin=2 on the 4×3×2 volume: blocks (2, 1, 1) of 2×2×2 voxels (the third K row left out), each the mean of
    its measured voxels with σ = √Σσ²/n; read in slabs of one block row (the slab loop itself is exercised)."""
    path = tmp_path / "volume.nxs"
    (h, k, l), intensity = write_nxdata(path)
    monkeypatch.setattr("ase_tds.io.nexus.NEXUS_SLAB_VOXELS", 1)
    data = TDSData.read(path, structure=ni, bin=2)
    assert len(data) == 2
    for row, block in enumerate((intensity[0:2, 0:2, :], intensity[2:4, 0:2, :])):
        values = block[np.isfinite(block)]
        assert data.intensity[row] == pytest.approx(values.mean())
        assert data.sigma[row] == pytest.approx(np.sqrt(values.sum()) / len(values))  # σ² = I per voxel here
    np.testing.assert_allclose(data.hkl[:, 0], [h[0:2].mean(), h[2:4].mean()])
    np.testing.assert_allclose(data.hkl[:, 1:], [[k[0:2].mean(), l.mean()]] * 2)
    with pytest.raises(TDSError, match="larger than the volume"):
        TDSData.read(path, structure=ni, bin=5)
    with pytest.raises(TDSError, match="whole number of voxels"):
        TDSData.read(path, structure=ni, bin=0)


def test_nxdata_axes_matched_by_name(tmp_path, ni):
    """A volume stored (L, K, H), Mantid-style axis names: each voxel gets its own hkl; unnamed axes refused."""
    path = tmp_path / "lkh.nxs"
    h, k, l = np.array([0.1, 0.2, 0.3, 0.4]), np.array([1.0, 1.5]), np.array([-2.0, 0.0, 2.0])
    volume = np.arange(len(l) * len(k) * len(h), dtype=float).reshape(len(l), len(k), len(h)) + 1
    with h5py.File(path, "w") as f:
        group = f.create_group("data")
        group.attrs.update(NX_class="NXdata", signal="I", axes=["[0,0,L]", "[0,K,0]", "[H,0,0]"], temperature=20.0)
        group["I"] = volume
        group["[0,0,L]"], group["[0,K,0]"], group["[H,0,0]"] = l, k, h
    data = TDSData.read(path, structure=ni)
    for index in [(0, 0, 0), (2, 1, 3), (1, 0, 2)]:
        row = np.ravel_multi_index(index, volume.shape)
        np.testing.assert_allclose(data.hkl[row], [h[index[2]], k[index[1]], l[index[0]]])
        assert data.intensity[row] == volume[index]
    with h5py.File(path, "a") as f:
        f["data"].attrs["axes"] = ["x", "y", "z"]
        f["data"]["x"], f["data"]["y"], f["data"]["z"] = l, k, h
    with pytest.raises(TDSError, match="name the three axis datasets H, K and L"):
        TDSData.read(path, structure=ni)


def test_nxdata_bin_edges_become_centres(tmp_path, ni):
    path = tmp_path / "edges.nxs"
    with h5py.File(path, "w") as f:
        group = f.create_group("data")
        group.attrs.update(NX_class="NXdata", signal="I", axes=["h", "k", "l"], temperature=20.0)
        group["I"] = np.ones((2, 1, 1))
        group["h"], group["k"], group["l"] = [0.0, 1.0, 2.0], [0.0], [3.0]
    data = TDSData.read(path, structure=ni)
    np.testing.assert_allclose(data.hkl, [[0.5, 0.0, 3.0], [1.5, 0.0, 3.0]])
    assert data.sigma is None and data.temperature == 20.0


# ---- validation messages ---------------------------------------------------------------------------


def test_bad_arrays_are_refused(ni):
    hkl, intensity = np.zeros((3, 3)), np.ones(3)
    cases = [
        (dict(intensity=[1.0, np.nan, 1.0]), "field 'intensity' has 1 NaN/inf"),
        (dict(hkl=[[0, 0, 0], [0, np.inf, 0], [1, 1, 1]]), "field 'hkl' has 1 NaN/inf"),
        (dict(sigma=[0.1, np.nan, 0.1]), "field 'sigma' has 1 NaN/inf"),
        (dict(sigma=[0.1, 0.0, -1.0]), "field 'sigma' has 2 values ≤ 0"),
        (dict(sigma=[0.1, 0.1]), "field 'sigma' has shape (2,)"),
        (dict(hkl=np.zeros((3, 2))), "field 'hkl' has shape (3, 2)"),
        (dict(intensity=np.ones((3, 1))), "field 'intensity' has shape (3, 1)"),
        (dict(intensity=[]), "field 'intensity' holds no points"),
        (dict(mask=[1, 2, 0]), "field 'mask' is not boolean"),
        (dict(mask=["yes", "no", "yes"]), "field 'mask' is not boolean"),
        (dict(mask=[True, False]), "field 'mask' has shape (2,)"),
        (dict(temperature=-5.0), "field 'temperature' is -5.0 K"),
        (dict(units=3), "field 'units' is 3, not text"),
    ]
    for change, message in cases:
        kwargs = dict(hkl=hkl, intensity=intensity, cell=ni.cell) | change
        with pytest.raises(TDSError, match=message.replace("(", r"\(").replace(")", r"\)")):
            TDSData.from_hkl(**kwargs)
    assert TDSData.from_hkl(hkl, intensity, ni.cell, mask=[1, 0, 1]).n_used == 2  # 0/1 masks are fine


def test_q_and_hkl_must_agree(ni):
    with pytest.raises(TDSError, match="field 'q' disagrees"):
        TDSData(q=np.ones((2, 3)), intensity=[1.0, 1.0], hkl=np.zeros((2, 3)), cell=np.asarray(ni.cell))
    with pytest.raises(TDSError, match="field 'cell' is missing but hkl are given"):
        TDSData(q=np.zeros((2, 3)), intensity=[1.0, 1.0], hkl=np.zeros((2, 3)))


def test_require_temperature(ni):
    data = TDSData.from_hkl(np.zeros((1, 3)), [1.0], ni.cell, source="scan.h5")
    with pytest.raises(TDSError, match="scan.h5: field 'temperature' is missing.*--temperature"):
        data.require_temperature()
    assert data.require_temperature(override=77) == 77.0
    hot = TDSData.from_hkl(np.zeros((1, 3)), [1.0], ni.cell, temperature=300.0)
    assert hot.require_temperature() == 300.0 and hot.require_temperature(override=10.0) == 10.0
    with pytest.raises(TDSError, match="field 'temperature \\(override\\)' is 0.0 K"):
        hot.require_temperature(override=0)


def test_check_cell_names_both_cells(tmp_path, ni):
    data = TDSData.from_hkl(np.zeros((1, 3)), [1.0], ni.cell, temperature=300.0)
    data.check_cell(ni.cell * (1 + 1e-4))  # within 1e-3 relative
    rotated = ni.copy()
    rotated.rotate(30, "z", rotate_cell=True)
    data.check_cell(rotated.cell)  # orientation is free
    with pytest.raises(TDSError, match=r"3\.5200.*differs from the cell of the structure.*3\.6000"):
        data.check_cell(bulk("Ni", "fcc", a=3.60, cubic=True).cell)
    path = tmp_path / "ni.h5"
    data.write(path)
    with pytest.raises(TDSError, match=rf"{path}: field 'cell' .*3\.5200.* differs from the cell of the "
                                       r"structure Cu4 \(3\.6150"):
        TDSData.read(path, structure=bulk("Cu", "fcc", a=3.615, cubic=True))


def test_file_errors_name_file_and_field(tmp_path, ni):
    no_cell = tmp_path / "no_cell.h5"
    with h5py.File(no_cell, "w") as f:
        f["hkl"], f["intensity"] = np.zeros((2, 3)), np.ones(2)
    with pytest.raises(TDSError, match=f"{no_cell}: field 'hkl' .* pass the structure"):
        TDSData.read(no_cell)
    no_intensity = tmp_path / "no_intensity.h5"
    with h5py.File(no_intensity, "w") as f:
        f["hkl"] = np.zeros((2, 3))
    with pytest.raises(TDSError, match=f"{no_intensity}: no dataset 'intensity'"):
        TDSData.read(no_intensity, structure=ni)
    bad_sigma = tmp_path / "bad_sigma.h5"
    with h5py.File(bad_sigma, "w") as f:
        f["hkl"], f["intensity"], f["sigma"] = np.zeros((2, 3)), np.ones(2), [1.0, -1.0]
    with pytest.raises(TDSError, match=f"{bad_sigma}: field 'sigma' has 1 values ≤ 0"):
        TDSData.read(bad_sigma, structure=ni)
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(TDSError, match="no NXdata group"):
        TDSData.read(empty, structure=ni)
    text = tmp_path / "data.txt"
    text.write_text("1 2 3\n")
    with pytest.raises(TDSError, match="neither HDF5 nor .npz"):
        TDSData.read(text, structure=ni)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        TDSData.read(tmp_path / "missing.h5", structure=ni)


def test_nxdata_errors(tmp_path, ni):
    path = tmp_path / "bad_axes.nxs"
    write_nxdata(path)
    with h5py.File(path, "a") as f:
        del f["entry/diffuse/K"]
        f["entry/diffuse/K"] = np.zeros(5)
    with pytest.raises(TDSError, match="entry/diffuse: field 'K' has 5 values but the intensity has 3"):
        TDSData.read(path, structure=ni)
    with h5py.File(path, "a") as f:
        f["entry/diffuse"].attrs["axes"] = ["H", "K"]
    with pytest.raises(TDSError, match="field 'axes'"):
        TDSData.read(path, structure=ni)
    with h5py.File(path, "a") as f:
        f["entry/diffuse"].attrs["signal"] = "nothing"
    with pytest.raises(TDSError, match="field 'signal'"):
        TDSData.read(path, structure=ni)


# ---- selections ------------------------------------------------------------------------------------


def test_bragg_mask_fcc_conventional_cell(ni):
    hkl = np.array([[1, 1, 1], [2, 0, 0], [1, 0, 0], [1.3, 1, 1], [2.05, 0.0, 0.05], [0, 2, 2], [1, 1, 0]])
    data = TDSData.from_hkl(hkl, np.ones(len(hkl)), ni.cell)
    primitive = bulk("Ni", "fcc", a=A_NI)
    masked = data.mask_bragg(radius=0.1, primitive_cell=primitive.cell)
    # allowed (all odd / all even) reflections and a point 0.07 r.l.u. from (2 0 0) go; (1 0 0), (1 1 0)
    # (forbidden in the conventional cell) and a point 0.3 r.l.u. from (1 1 1) stay
    np.testing.assert_array_equal(masked.mask, [False, False, True, True, False, False, True])
    assert masked.n_used == 3 and len(masked) == len(data)
    np.testing.assert_array_equal(data.mask_bragg().mask, [False, False, False, True, False, False, False])
    with pytest.raises(TDSError, match="field 'primitive_cell' does not span"):
        data.mask_bragg(primitive_cell=bulk("Ni", "fcc", a=3.0).cell)


def test_slice_and_window(ni):
    grid = np.stack(np.meshgrid(*3 * [np.arange(-2, 2.01, 0.25)], indexing="ij"), axis=-1).reshape(-1, 3)
    data = TDSData.from_hkl(grid, np.ones(len(grid)), ni.cell, temperature=300.0)
    hk0 = data.slice(normal=(0, 0, 1), offset=0.0, thickness=0.1)
    assert len(hk0) == 17**2 and np.all(hk0.hkl[:, 2] == 0) and hk0.temperature == 300.0
    plane = data.slice(normal=(1, 1, 1), offset=1.0, thickness=0.01)
    np.testing.assert_allclose(plane.hkl.sum(axis=1), 1.0)
    np.testing.assert_allclose(plane.q, 2 * np.pi / A_NI * plane.hkl)
    with pytest.raises(TDSError, match="no points within"):
        data.slice(normal=(0, 0, 1), offset=5.0)
    shell = data.mask_window(q_min=2.0, q_max=4.0)
    assert len(shell) == len(data)
    assert np.all((shell.q_norm[shell.mask] >= 2.0) & (shell.q_norm[shell.mask] <= 4.0))
    assert shell.n_used == np.count_nonzero((data.q_norm >= 2.0) & (data.q_norm <= 4.0))
    box = data.mask_window(hkl_min=(0, 0, 0), hkl_max=(1, 1, 2))
    assert box.n_used == 5 * 5 * 9
    both = shell.mask_window(hkl_min=(0, 0, 0))  # masks accumulate
    assert both.n_used == np.count_nonzero(shell.mask & np.all(data.hkl >= 0, axis=1))
    picked = data.select([0, 5])
    np.testing.assert_allclose(picked.hkl, data.hkl[[0, 5]])
    with pytest.raises(TDSError, match="field 'hkl' is needed by slice"):
        TDSData.from_q(data.q, data.intensity).slice(normal=(0, 0, 1))


# ---- synthetic noise -------------------------------------------------------------------------------


def test_poisson_noise_relative_sigma(ni):
    n, counts = 20000, 400.0
    data = TDSData.from_hkl(np.full((n, 3), 0.5), np.full(n, 3.0), ni.cell)
    noisy = add_poisson_noise(data, counts, np.random.default_rng(1))
    relative_spread = np.std(noisy.intensity) / 3.0
    # the sample std of n Poisson draws scatters by ~1/√(2n) relative: 0.5 % here, test at 4 %
    assert relative_spread == pytest.approx(1 / np.sqrt(counts), rel=0.04)
    assert np.mean(noisy.sigma / noisy.intensity) == pytest.approx(1 / np.sqrt(counts), rel=0.04)
    assert np.mean(noisy.intensity) == pytest.approx(3.0, rel=0.005)
    again = add_poisson_noise(data, counts, np.random.default_rng(1))
    np.testing.assert_array_equal(again.intensity, noisy.intensity)
    zero = add_poisson_noise(TDSData.from_hkl(np.zeros((2, 3)), [0.0, 1.0], ni.cell), 10.0, 0)
    assert zero.intensity[0] == 0.0 and zero.sigma[0] == pytest.approx(1 / 20.0)  # √max(0, 1)/scale
    with pytest.raises(TDSError, match="negative values"):
        add_poisson_noise(TDSData.from_hkl(np.zeros((1, 3)), [-1.0], ni.cell), 10.0, 0)


# ---- atomic write ----------------------------------------------------------------------------------


def test_failed_write_leaves_nothing(tmp_path, ni, monkeypatch):
    data = random_data(ni, temperature=300.0)
    path = tmp_path / "out.h5"

    def broken(self, name, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", broken)
    with pytest.raises(OSError, match="disk full"):
        data.write(path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    data.write(path)  # an existing file is kept intact when a later write fails
    before = path.read_bytes()
    monkeypatch.setattr(h5py.Group, "create_dataset", broken)
    with pytest.raises(OSError):
        data.write(path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_written_file_has_the_permissions_of_a_plain_file(tmp_path, ni):
    """Atomic writes must not leave the 0600 mode of a private temporary file: group/others read as usual."""
    plain = tmp_path / "plain"
    plain.write_text("")
    path = tmp_path / "out.h5"
    random_data(ni, temperature=300.0).write(path)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


@pytest.mark.parametrize("build, message", [
    (lambda cell: TDSData.from_hkl(np.zeros((3, 2)), np.ones(3), cell),
     "field 'hkl' has shape (3, 2); give an array of shape (3, 3), one entry per point (N = 3, as in intensity)"),
    (lambda cell: TDSData.from_hkl(np.zeros((2, 3)), np.ones(3), cell), "field 'hkl' has shape (2, 3); give an array "
                                                                        "of shape (3, 3)"),
    (lambda cell: TDSData.from_hkl(np.zeros((3, 3)), np.ones(3), cell, sigma=np.ones((3, 1))),
     "field 'sigma' has shape (3, 1); give an array of shape (3,)"),
    (lambda cell: TDSData.from_hkl(np.zeros((3, 3)), np.ones(3), cell[:2]),
     "field 'cell' has shape (2, 3); give an array of shape (3, 3)"),
    (lambda cell: TDSData.from_hkl(np.zeros((3, 3)), np.ones(3), 0 * cell), "field 'cell' has zero volume"),
    (lambda cell: TDSData.from_q(np.zeros((3, 2)), np.ones(3), cell=cell),
     "field 'q' has shape (3, 2); give an array of shape (3, 3)"),
    (lambda cell: TDSData.from_q(np.zeros((3, 3)), np.ones(3), cell=cell[:2]),
     "field 'cell' has shape (2, 3); give an array of shape (3, 3)"),
], ids=["hkl (N, 2)", "hkl of another N", "sigma (N, 1)", "cell (2, 3)", "zero cell", "q (N, 2)", "from_q cell (2, 3)"])
def test_wrong_shapes_name_the_field_and_the_shape_it_needs(ni, build, message):
    """The field at fault and the shape it needs, e.g. (N, 3) for hkl, not "the same number of points"."""
    with pytest.raises(TDSError) as error:
        build(np.array(ni.cell))
    assert message in str(error.value) and "number of points" not in str(error.value)
