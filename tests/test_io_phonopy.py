"""Phonopy files written by ase_tds: read back by phonopy (Python API and command line) and checked
against the model (frequencies), against each other (the three files) and against Dulong–Petit."""

import os
import shutil
import subprocess

import numpy as np
import phonopy
import pytest
import yaml
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from phonopy.file_IO import parse_FORCE_CONSTANTS, read_force_constants_hdf5
from scipy.constants import N_A, h, k

from ase_tds import ForceConstantModel
from ase_tds.io.phonopy import read_force_constants, write_phonopy_files

R_GAS = N_A * k  # J/K/mol
H_OVER_KB = h * 1e12 / k  # K/THz


def dense_path(corners_hkl, points_per_segment=40):
    """hkl (M, 3) along straight segments between the given corners."""
    corners = np.asarray(corners_hkl, dtype=float)
    t = np.linspace(0.0, 1.0, points_per_segment, endpoint=False)[:, None, None]
    path = corners[:-1][None] + t * (corners[1:] - corners[:-1])[None]
    return np.vstack([path.transpose(1, 0, 2).reshape(-1, 3), corners[-1:]])


CRYSTALS = {
    # fcc Ni, conventional cubic cell: Γ–X–W–L–Γ–K
    "Ni": (lambda: bulk("Ni", "fcc", a=3.52, cubic=True), 5,
           [[0, 0, 0], [0, 1, 0], [0.5, 1, 0], [0.5, 0.5, 0.5], [0, 0, 0], [0.75, 0.75, 0]]),
    # L1₂ AuCu3 (4 atoms, simple cubic): Γ–X–M–Γ–R–X
    "AuCu3": (lambda: Atoms("AuCu3", cell=3.75 * np.eye(3), pbc=True,
                            scaled_positions=[[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]), 3,
              [[0, 0, 0], [0, 0.5, 0], [0.5, 0.5, 0], [0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0]]),
}


@pytest.fixture(scope="module")
def models():
    """{name: ForceConstantModel} with force constants from EMT."""
    return {name: ForceConstantModel(build(), shells=shells).set_from_calculator(EMT(), progress=False)
            for name, (build, shells, _) in CRYSTALS.items()}


@pytest.fixture(scope="module", params=sorted(CRYSTALS))
def written(request, models, tmp_path_factory):
    """(model, files, path hkl, phonopy.load of the yaml) for each crystal, files in a fresh folder."""
    model = models[request.param]
    files = write_phonopy_files(model, tmp_path_factory.mktemp(request.param))
    loaded = phonopy.load(files["phonopy_params.yaml"], produce_fc=False, log_level=0)
    return model, files, dense_path(CRYSTALS[request.param][2]), loaded


def test_phonopy_frequencies_equal_the_model_on_a_band_path(written):
    model, files, hkl, ph = written
    q = model.q_from_hkl(hkl)
    ph.run_qpoints(q @ np.array(ph.primitive.cell).T / (2 * np.pi))  # reduced coordinates of the primitive cell
    expected = model.frequencies(q)
    assert ph.qpoints.frequencies.shape == expected.shape
    assert np.abs(ph.qpoints.frequencies - expected).max() < 1e-6  # THz
    away_from_gamma = np.linalg.norm(hkl, axis=1) > 0
    assert expected[away_from_gamma].min() > 0  # the crystals are dynamically stable


def test_three_files_hold_the_same_force_constants(written):
    files = written[1]
    ph = read_force_constants(files["phonopy_params.yaml"].parent)  # the folder, as `ase-tds fit` writes it
    p2s = ph.primitive.p2s_map
    assert ph.force_constants.shape == (len(p2s), len(ph.supercell), 3, 3)  # compact
    text = parse_FORCE_CONSTANTS(files["FORCE_CONSTANTS"], p2s_map=p2s)
    hdf5 = read_force_constants_hdf5(files["force_constants.hdf5"], p2s_map=p2s)
    np.testing.assert_allclose(text, ph.force_constants, rtol=0, atol=1e-12)
    np.testing.assert_allclose(hdf5, ph.force_constants, rtol=0, atol=1e-12)


def test_thermal_properties_approach_dulong_petit(written):
    """Cv per mole of primitive cells: R·n_modes·(1 − x²/12) ≤ Cv ≤ R·n_modes at x = hν_max/k_BT,
    because each mode's Einstein function x²eˣ/(eˣ−1)² lies between 1 − x²/12 and 1."""
    model, _, _, ph = written
    ph.run_mesh([8, 8, 8], is_gamma_center=True)
    ph.run_thermal_properties(t_min=0, t_max=3000, t_step=100, exclude_gamma_acoustic=True)
    tp = ph.thermal_properties
    cv = tp.heat_capacity[1:]
    assert np.all(np.isfinite(cv)) and np.all(cv > 0) and np.all(np.diff(cv) > 0)
    modes_per_cell = tp.number_of_integrated_modes / ph.mesh.weights.sum()  # Γ acoustic modes excluded
    x_max = H_OVER_KB * ph.mesh.frequencies.max() / tp.temperatures[-1]
    assert R_GAS * modes_per_cell * (1 - x_max**2 / 12) <= tp.heat_capacity[-1] <= R_GAS * modes_per_cell
    assert tp.heat_capacity[-1] == pytest.approx(3 * model.n_atoms * R_GAS, rel=0.01)

    ph.run_total_dos()
    dos = ph.total_dos
    assert np.all(np.isfinite(dos.dos)) and dos.dos.min() >= 0
    assert np.trapezoid(dos.dos, dos.frequency_points) == pytest.approx(3 * model.n_atoms, rel=0.02)


@pytest.mark.skipif(shutil.which("phonopy") is None, reason="no phonopy executable")
def test_phonopy_command_line_reads_the_yaml(written, tmp_path):
    _, files, _, ph = written
    shutil.copy(files["phonopy_params.yaml"], tmp_path)
    command = ["phonopy", "phonopy_params.yaml", "--mesh", "8", "8", "8", "--gc", "-t",
               "--exclude-gamma-acoustic", "--tmax", "3000", "--tstep", "500"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    rows = yaml.safe_load((tmp_path / "thermal_properties.yaml").read_text())["thermal_properties"]
    cli = np.array([row["heat_capacity"] for row in rows])

    ph.run_mesh([8, 8, 8], is_gamma_center=True)
    ph.run_thermal_properties(t_min=0, t_max=3000, t_step=500, exclude_gamma_acoustic=True)
    np.testing.assert_allclose(cli, ph.thermal_properties.heat_capacity, rtol=0, atol=2e-7)  # file: 7 decimals


@pytest.mark.parametrize("broken", ["phonopy.Phonopy.save", "ase_tds.io.phonopy.write_force_constants_to_hdf5"])
def test_writing_is_atomic(models, tmp_path, monkeypatch, broken):
    """A failure in the first or the last writer leaves neither new, partial nor temporary files."""
    model = models["AuCu3"]
    monkeypatch.setattr(broken, _disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_phonopy_files(model, tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []

    monkeypatch.undo()
    files = write_phonopy_files(model, tmp_path / "existing")
    before = {name: path.read_bytes() for name, path in files.items()}
    model.theta.data *= 2  # new content, so that a partial replacement would show
    try:
        monkeypatch.setattr(broken, _disk_full)
        with pytest.raises(OSError, match="disk full"):
            write_phonopy_files(model, tmp_path / "existing")
    finally:
        model.theta.data /= 2
    assert {path.name: path.read_bytes() for path in (tmp_path / "existing").iterdir()} == before


def _disk_full(*args, **kwargs):
    raise OSError("disk full")


def test_reader_errors(written, tmp_path):
    files = written[1]
    for bare in ("FORCE_CONSTANTS", "force_constants.hdf5"):
        with pytest.raises(ValueError, match="phonopy_params.yaml"):
            read_force_constants(files[bare])
    with pytest.raises(FileNotFoundError, match="no phonopy file"):
        read_force_constants(tmp_path / "missing.yaml")
    (tmp_path / "junk.yaml").write_text("just: text\n")
    with pytest.raises(ValueError, match="junk.yaml"):
        read_force_constants(tmp_path / "junk.yaml")
