"""NXRefine's volumes (written here with nexusformat in NXRefine's layout: entry/masked_transform, NXdata(data,
[Ql, Qk, Qh]) with weights, entry/sample's temperature and unitcell_*) are read as the same data as a point list."""

from pathlib import Path

import h5py
import numpy as np
import pytest
from ase.io import write

from ase_tds import ForceConstantModel, Optimizer, TDSData, fit, simulate
from ase_tds.cli import main
from ase_tds.io import readers
from ase_tds.io.base import TDSError

from conftest import NI_A, ni_conventional

nexus = pytest.importorskip("nexusformat.nexus")

FAST = dict(dw_mesh=4)
QH, QK, QL = np.linspace(0.15, 1.35, 7), np.linspace(-0.4, 0.8, 5), np.array([0.3, 0.6, 1.8])  # off every peak


@pytest.fixture(scope="module")
def truth():
    return ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59})


@pytest.fixture(scope="module")
def volume(truth):
    """(hkl (nl, nk, nh, 3), intensity (nl, nk, nh) e.u./atom, weights (nl, nk, nh), 0 = unmeasured)."""
    ql, qk, qh = np.meshgrid(QL, QK, QH, indexing="ij")  # NXRefine's native order: (nl, nk, nh)
    hkl = np.stack([qh, qk, ql], axis=-1)
    intensity = simulate(truth, hkl.reshape(-1, 3), 300.0, method="one-phonon", statistics="classical",
                         tds_options=FAST).intensity.reshape(ql.shape)
    weights = np.random.default_rng(7).integers(0, 5, ql.shape).astype(float)  # contributions; 0: not measured
    return hkl, intensity, weights


def write_nxrefine(path, volume, scale=1000.0, entry="entry", cellpar=(NI_A, NI_A, NI_A, 90.0, 90.0, 90.0)):
    """NXRefine's layout: entry/masked_transform with the summed signal and its weights, a transform that is not the
    one to read (twice the signal), and entry/sample."""
    _, intensity, weights = volume
    axes = [nexus.NXfield(QL, name="Ql"), nexus.NXfield(QK, name="Qk"), nexus.NXfield(QH, name="Qh")]
    root = nexus.NXroot()
    root[entry] = nexus.NXentry()
    root[entry]["sample"] = nexus.NXsample(temperature=nexus.NXfield(300.0, units="K"),
                                           **dict(zip(["unitcell_a", "unitcell_b", "unitcell_c", "unitcell_alpha",
                                                       "unitcell_beta", "unitcell_gamma"], cellpar)))
    root[entry]["masked_transform"] = nexus.NXdata(nexus.NXfield(scale * intensity * weights, name="data"), axes)
    root[entry]["masked_transform/weights"] = nexus.NXfield(weights)
    root[entry]["transform"] = nexus.NXdata(nexus.NXfield(2 * scale * intensity, name="data"), axes)
    root.save(str(path), "w")


def test_nxrefine_volume_fits_to_the_theta_of_the_same_points(tmp_path, truth, volume):
    """The volume read (I = data/weights, σ = √data/weights) and the same measured voxels written as a point list
    (in another order) give one fit, θ equal to 1e-10."""
    hkl, intensity, weights = volume
    write_nxrefine(tmp_path / "ni.nxs", volume)
    assert readers.reader_for(tmp_path / "ni.nxs").name == "nxrefine"
    read = TDSData.read(tmp_path / "ni.nxs", structure=ni_conventional())
    measured = weights > 0
    counts = 1000.0 * intensity[measured] * weights[measured]
    order = np.random.default_rng(1).permutation(measured.sum())
    sigma = np.sqrt(counts) / weights[measured]
    TDSData.from_hkl(hkl[measured][order], 1000.0 * intensity[measured][order], ni_conventional(), sigma=sigma[order],
                     temperature=300.0).write(tmp_path / "points.h5")
    points = TDSData.read(tmp_path / "points.h5", structure=ni_conventional())
    assert read.temperature == 300.0 and len(read) == len(points) == measured.sum() and read.units is None
    np.testing.assert_allclose(read.hkl, hkl[measured], rtol=0, atol=1e-15)
    np.testing.assert_allclose(read.intensity, 1000.0 * intensity[measured], rtol=1e-14)
    start, thetas = 0.8 * truth.theta.detach().numpy(), []
    for data in (read, points):
        model = ForceConstantModel(ni_conventional(), shells=1).set_parameters(start)
        fit(model, data, method="one-phonon", statistics="classical", tds_options=FAST, progress=False,
            optimizer=Optimizer(max_iter=5), explain_misfit=False)
        thetas.append(model.theta.detach().numpy())
    assert np.abs(thetas[0] - start).max() > 1e-3  # the fit moved
    np.testing.assert_allclose(thetas[0], thetas[1], rtol=0, atol=1e-10)


def test_ase_tds_fit_reads_an_nxrefine_file_with_its_bragg_mask(tmp_path, volume, capsys, monkeypatch):
    """`ase-tds fit STRUCTURE file.nxs` takes the volume through the reader table, with --mask-bragg in Å⁻¹."""
    monkeypatch.setattr("ase_tds.plot._save", lambda fig, path: Path(path).write_bytes(b"-"))  # not rendered
    write_nxrefine(tmp_path / "ni.nxs", volume)
    write(tmp_path / "Ni.cif", ni_conventional())
    code = main([str(a) for a in ("fit", tmp_path / "Ni.cif", tmp_path / "ni.nxs", "--out", tmp_path / "fit",
                                  "--shells", 1, "--model", "one-phonon", "--statistics", "classical",
                                  "--max-iter", 30, "--mask-bragg", "1.2invA")])
    assert code in (0, 3, 4), capsys.readouterr().err
    used = TDSData.read(tmp_path / "fit" / "data.h5").mask
    expected = TDSData.read(tmp_path / "ni.nxs", structure=ni_conventional()).mask_bragg(
        1.2, structure=ni_conventional(), units="invA").mask
    assert 0 < used.sum() < len(used) and np.array_equal(used, expected)


def test_merged_transform_scan_entries_units_and_lattice(tmp_path, volume):
    """Without weights (the merged transform) data ≤ 0 or NaN are unmeasured and σ is not known; the root's default
    names the entry; °C are converted; unit_cell is read and compared with the structure; several scans without a
    merged entry are refused."""
    hkl, intensity, _ = volume
    data = 5.0 * intensity.copy()
    data[0, 0, 0], data[1, 2, 3], data[2, 4, 6] = 0.0, np.nan, -1.0
    axes = [nexus.NXfield(QL, name="Ql"), nexus.NXfield(QK, name="Qk"), nexus.NXfield(QH, name="Qh")]
    root = nexus.NXroot()
    for name in ("f1", "f2"):
        root[name] = nexus.NXentry(transform=nexus.NXdata(nexus.NXfield(data, name="data"), axes))
    root["f2"]["sample"] = nexus.NXsample(temperature=nexus.NXfield([26.0, 27.0], units="C"),
                                          unit_cell=nexus.NXfield([NI_A, NI_A, NI_A, 90.0, 90.0, 90.0]))
    root.save(str(tmp_path / "scans.nxs"), "w")
    with pytest.raises(TDSError, match="entries f1, f2 each hold a transform.*`default`"):
        TDSData.read(tmp_path / "scans.nxs", structure=ni_conventional())
    with h5py.File(tmp_path / "scans.nxs", "a") as f:
        f.attrs["default"] = "f2"
    read = TDSData.read(tmp_path / "scans.nxs")  # the cell from unit_cell
    keep = data > 0
    assert len(read) == keep.sum() == data.size - 3 and read.sigma is None
    np.testing.assert_allclose(read.intensity, data[keep])
    np.testing.assert_allclose(read.hkl, hkl[keep])
    assert read.temperature == pytest.approx(26.5 + 273.15)
    with pytest.raises(TDSError, match="differs from the cell"):
        TDSData.read(tmp_path / "scans.nxs", structure=ni_conventional() * (1, 1, 2))
    with h5py.File(tmp_path / "scans.nxs", "a") as f:
        f["f2/sample/temperature"].attrs["units"] = "F"
    with pytest.raises(TDSError, match="temperature' has units 'f'; give it in K"):
        TDSData.read(tmp_path / "scans.nxs")


def test_an_external_link_to_a_missing_transform_file_is_named(tmp_path, volume):
    """NXRefine links entry/masked_transform/data to the transform file (/entry/data/v); read through it, and a
    missing file is named."""
    _, intensity, weights = volume
    with h5py.File(tmp_path / "f1_transform.nxs", "w") as f:
        f["entry/data/v"], f["entry/data/n"] = intensity * weights, weights
    axes = [nexus.NXfield(QL, name="Ql"), nexus.NXfield(QK, name="Qk"), nexus.NXfield(QH, name="Qh")]
    root = nexus.NXroot(nexus.NXentry())
    root["entry/masked_transform"] = nexus.NXdata(
        nexus.NXlink(name="data", target="/entry/data/v", file="f1_transform.nxs"), axes)
    root["entry/masked_transform/weights"] = nexus.NXlink(target="/entry/data/n", file="f1_transform.nxs")
    root.save(str(tmp_path / "ni.nxs"), "w")
    read = TDSData.read(tmp_path / "ni.nxs", structure=ni_conventional())
    np.testing.assert_allclose(read.intensity, intensity[weights > 0], rtol=1e-14)
    (tmp_path / "f1_transform.nxs").unlink()
    with pytest.raises(TDSError, match="field 'data' links to f1_transform.nxs:/entry/data/v, which cannot be opened"):
        TDSData.read(tmp_path / "ni.nxs", structure=ni_conventional())


def test_a_plain_nxdata_volume_stays_with_the_nexus_reader(tmp_path):
    with h5py.File(tmp_path / "plain.nxs", "w") as f:
        group = f.create_group("entry/data")
        group.attrs.update(NX_class="NXdata", signal="I", axes=["Qh", "Qk", "Ql"])
        group["I"], group["Qh"], group["Qk"], group["Ql"] = np.ones((2, 1, 1)), [0.1, 0.2], [0.3], [0.4]
    assert readers.reader_for(tmp_path / "plain.nxs").name == "nexus"
    read = TDSData.read(tmp_path / "plain.nxs", structure=ni_conventional())
    np.testing.assert_allclose(read.hkl, [[0.1, 0.3, 0.4], [0.2, 0.3, 0.4]])
    assert read.sigma is None
