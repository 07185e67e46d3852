"""The reader table (ase_tds.io.readers): a new format is one Reader and one entry, read by TDSData.read and by
`ase-tds simulate --hkl`; a damaged HDF5 file is refused with a TDSError naming it."""

from pathlib import Path

import h5py
import numpy as np
import pytest
from ase.io import read, write

from ase_tds import ForceConstantModel, TDSData, simulate
from ase_tds.cli import main
from ase_tds.data import TDSError
from ase_tds.io import readers
from ase_tds.io.base import Reader
from ase_tds.io.phonopy import write_phonopy_files

from conftest import ni_conventional

# ---- a toy format, as a new module of ase_tds/io would define it ---------------------------------------------


def read_csv(path: Path) -> dict:
    """A comma-separated point list: a '# temperature: T' header line, then rows h, k, l, intensity, sigma."""
    header = path.read_text().splitlines()[0]
    table = np.loadtxt(path, delimiter=",", ndmin=2)
    return dict(hkl=table[:, :3], intensity=table[:, 3], sigma=table[:, 4],
                temperature=float(header.split(":")[1]), units="e.u./atom")


CSV = Reader("csv", lambda path: path.suffix == ".csv", read_csv)


@pytest.fixture
def csv_registered(monkeypatch):
    """The table with the toy reader registered, restored afterwards."""
    monkeypatch.setattr(readers, "READERS", list(readers.READERS))
    readers.register(CSV)
    return CSV


def write_csv(path, hkl, intensity, sigma, temperature):
    np.savetxt(path, np.column_stack([hkl, intensity, sigma]), delimiter=",", header=f"temperature: {temperature}")


@pytest.fixture(scope="module")
def truth_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readers")
    write(folder / "Ni.cif", ni_conventional())
    truth = ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59})
    write_phonopy_files(truth, folder / "truth")
    return folder / "Ni.cif", folder / "truth", truth


def test_a_registered_reader_is_read_by_tdsdata_read(tmp_path, csv_registered):
    hkl = np.random.default_rng(0).uniform(-3, 3, size=(20, 3))
    intensity, sigma = np.linspace(1.0, 2.0, 20), np.full(20, 0.1)
    write_csv(tmp_path / "points.csv", hkl, intensity, sigma, 120.0)
    assert readers.READERS[0] is csv_registered and readers.reader_for(tmp_path / "points.csv") is csv_registered
    data = TDSData.read(tmp_path / "points.csv", structure=ni_conventional())
    np.testing.assert_allclose(data.hkl, hkl, rtol=0, atol=1e-15)
    np.testing.assert_allclose(data.intensity, intensity)
    np.testing.assert_allclose(data.sigma, sigma)
    assert data.temperature == 120.0 and data.absolute and data.source == str(tmp_path / "points.csv")
    with pytest.raises(TDSError, match="bin=2 averages the voxels of a NeXus volume"):
        TDSData.read(tmp_path / "points.csv", structure=ni_conventional(), bin=2)


def test_a_registered_reader_is_read_by_simulate_hkl(tmp_path, truth_files, csv_registered, capsys):
    structure, fc, truth = truth_files
    hkl = np.random.default_rng(8).uniform(-3, 3, size=(30, 3))
    write_csv(tmp_path / "points.csv", hkl, np.ones(30), np.ones(30), 250.0)
    code = main([str(a) for a in ("simulate", structure, "--fc", fc, "--hkl", tmp_path / "points.csv",
                                  "--temperature", 250, "--model", "one-phonon", "--statistics", "classical",
                                  "--out", tmp_path / "sim.h5")])
    assert code == 0, capsys.readouterr().err
    data = TDSData.read(tmp_path / "sim.h5", structure=read(structure))
    np.testing.assert_allclose(data.hkl, hkl, rtol=0, atol=1e-15)
    expected = simulate(truth, hkl, 250.0, method="one-phonon", statistics="classical").intensity
    np.testing.assert_allclose(data.intensity, expected, rtol=1e-9)


def test_without_the_reader_a_csv_is_not_data(tmp_path):
    write_csv(tmp_path / "points.csv", np.zeros((2, 3)), np.ones(2), np.ones(2), 300.0)
    with pytest.raises(TDSError, match="neither HDF5 nor .npz"):
        TDSData.read(tmp_path / "points.csv", structure=ni_conventional())
    assert readers.reader_for(tmp_path / "points.csv", points_only=True).name == "hkl-text"


def test_each_format_has_its_reader(tmp_path):
    hkl = np.zeros((2, 3))
    with h5py.File(tmp_path / "points.h5", "w") as f:
        f["hkl"], f["intensity"] = hkl, np.ones(2)
    with h5py.File(tmp_path / "hkl.h5", "w") as f:
        f["hkl"] = hkl
    h5py.File(tmp_path / "volume.nxs", "w").close()
    np.savez(tmp_path / "points.npz", hkl=hkl, intensity=np.ones(2))
    np.save(tmp_path / "hkl.npy", hkl)
    np.savetxt(tmp_path / "hkl.txt", hkl)
    expected = {"points.h5": "hdf5", "hkl.h5": "hdf5-hkl", "volume.nxs": "nexus", "points.npz": "npz",
                "hkl.npy": "hkl-text", "hkl.txt": "hkl-text"}
    assert {name: readers.reader_for(tmp_path / name, points_only=True).name for name in expected} == expected
    assert readers.reader_for(tmp_path / "hkl.h5").name == "hdf5"  # as data: a point list without intensity


def damaged_copies(tmp_path) -> list[Path]:
    """An HDF5 point list cut short (an interrupted copy), and an HDF5 signature followed by garbage."""
    data = TDSData.from_hkl(np.random.default_rng(1).uniform(-3, 3, (500, 3)), np.ones(500), ni_conventional().cell,
                            temperature=300.0)
    data.write(tmp_path / "whole.h5")
    whole = (tmp_path / "whole.h5").read_bytes()
    (tmp_path / "truncated.h5").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "garbage.h5").write_bytes(whole[:8] + np.random.default_rng(2).bytes(4000))
    return [tmp_path / "truncated.h5", tmp_path / "garbage.h5"]


def test_a_damaged_hdf5_file_is_a_tds_error_naming_it(tmp_path, truth_files, capsys):
    structure, fc, _ = truth_files
    for path in damaged_copies(tmp_path):
        with pytest.raises(TDSError, match=f"{path}: an HDF5 file that cannot be read .* truncated or corrupt"):
            TDSData.read(path, structure=ni_conventional())
        for args in (["simulate", structure, "--fc", fc, "--hkl", path, "--temperature", 300, "--out",
                      tmp_path / "x.h5"], ["fit", structure, path, "--out", tmp_path / "fit"]):
            assert main([str(a) for a in args]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"ase-tds: error: {path}: an HDF5 file that cannot be read")
            assert "Traceback" not in err
