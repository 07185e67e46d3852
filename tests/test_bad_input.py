"""Every bad input a new user hit (issue 21): refused early, in one line naming the option or argument and the fix,
never a traceback and never a silent result. In-process (`ase_tds.cli.main`) on tiny data."""

import os
import warnings

import numpy as np
import pytest
from ase.build import bulk
from ase.io import write

import ase_tds.cli as cli
from ase_tds import ForceConstantModel, TDSData, fit, simulate
from ase_tds.fitting import FitResult
from ase_tds.fitting.covariance import SIGMA_MEANINGLESS, _meaningless_sigma
from ase_tds.io.phonopy import write_phonopy_files

from conftest import ni_conventional

TRUTH = {"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59}


def run(capsys, *args):
    """(exit code, stderr) of `ase-tds args` in this process."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One-shell nickel: its CIF, a phonopy folder, 40 one-phonon classical points (hkl off the Bragg peaks)."""
    folder = tmp_path_factory.mktemp("bad")
    write(folder / "Ni.cif", ni_conventional())
    truth = ForceConstantModel(ni_conventional(), shells=1).set_from_bvk(TRUTH)
    hkl = np.random.default_rng(5).uniform(-2, 2, size=(40, 3))
    simulate(truth, hkl, 300.0, method="one-phonon", statistics="classical").write(folder / "data.h5")
    write_phonopy_files(truth, folder / "truth")
    np.savetxt(folder / "hkl.txt", hkl[:5])
    return folder


def fit_args(files, tmp_path, *extra):
    return ["fit", files / "Ni.cif", files / "data.h5", "--out", tmp_path / "fit", "--shells", 1, "--model",
            "one-phonon", "--statistics", "classical", "--start", files / "truth", *extra]


def export_args(files, out, *extra):
    return ["export", files / "truth", "--supercell", 1, 1, 1, "--temperature", 300, "--samples", 2, "--out", out,
            *extra]


@pytest.fixture
def no_start(monkeypatch):
    """Fail the test if a fit computes its start: the refusal must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the start was computed before the bad option was refused")
    monkeypatch.setattr("ase_tds.fitting.set_start", refuse)


# ---------------------------------------------------------------- tracebacks
@pytest.mark.parametrize("command", ["fit", "plot", "export"])
def test_a_device_torch_does_not_know_is_refused(files, tmp_path, capsys, command):
    args = {"fit": fit_args(files, tmp_path), "plot": ["plot", files / "truth", "--out", tmp_path],
            "export": export_args(files, tmp_path / "x.extxyz")}[command]
    code, err = run(capsys, *args, "--device", "nonsense")
    assert code == 2 and "--device nonsense: not a torch device" in err


def test_cuda_without_a_gpu_is_refused_before_any_work(files, tmp_path, capsys, no_start, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, err = run(capsys, *fit_args(files, tmp_path), "--device", "cuda")
    assert code == 2 and "--device cuda: torch sees no CUDA device" in err and not (tmp_path / "fit").exists()


def test_ctrl_c_during_the_imports_exits_130_quietly(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_parser", interrupted)
    code, err = run(capsys, "demo")
    assert code == 130 and err.strip() == "ase-tds: interrupted; nothing was written"


def test_rank_zero_finishes_its_save_before_any_rank_exits(files, tmp_path, capsys, monkeypatch):
    """torchrun stops every rank as soon as one exits non-zero: the fit waits at a barrier after rank 0's save."""
    order = []
    monkeypatch.setattr("ase_tds.distributed.barrier", lambda: order.append("barrier"))
    save = FitResult.save
    monkeypatch.setattr(FitResult, "save", lambda self, *a, **k: (order.append("save"), save(self, *a, **k))[1])
    code, _ = run(capsys, *fit_args(files, tmp_path, "--max-iter", 1))
    assert code in (0, cli.NOT_CONVERGED) and order == ["save", "barrier"] and (tmp_path / "fit" / "fit.json").is_file()


# ---------------------------------------------------------------- silent overwrites
def test_simulate_never_writes_onto_its_own_hkl_file(files, tmp_path, capsys):
    data = tmp_path / "data.h5"
    data.write_bytes((files / "data.h5").read_bytes())
    before = data.read_bytes()
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, "simulate", files / "Ni.cif", "--fc", files / "truth", "--hkl", data, "--temperature",
                        300, "--out", data, *extra)
        assert code == 2 and "would replace the command's input --hkl" in err and data.read_bytes() == before


def test_export_refuses_an_existing_out_and_never_its_input(files, tmp_path, capsys):
    existing = tmp_path / "train.extxyz"
    existing.write_text("keep me")
    code, err = run(capsys, *export_args(files, existing))
    assert code == 2 and "exists; give --overwrite" in err and existing.read_text() == "keep me"
    params = files / "truth" / "phonopy_params.yaml"
    before = params.read_bytes()
    code, err = run(capsys, "export", params, "--supercell", 1, 1, 1, "--temperature", 300, "--samples", 2, "--out",
                    params, "--overwrite")
    assert code == 2 and "would replace the command's input SOURCE" in err and params.read_bytes() == before
    code, err = run(capsys, *export_args(files, existing, "--overwrite", "--seed", 1))
    assert code == 0 and existing.read_text() != "keep me"


def test_fit_refuses_an_earlier_fit_folder_unless_overwrite(files, tmp_path, capsys, no_start):
    earlier = tmp_path / "fit"
    earlier.mkdir()
    (earlier / "fit.json").write_text("{}")
    code, err = run(capsys, *fit_args(files, tmp_path))
    assert code == 2 and "holds an earlier output (fit.json); give --overwrite" in err
    assert (earlier / "fit.json").read_text() == "{}"


# ---------------------------------------------------------------- silent wrong results
def test_partial_occupancy_in_a_cif_is_refused(files, tmp_path, capsys):
    cif = tmp_path / "disordered.cif"
    text = (files / "Ni.cif").read_text()
    assert "_atom_site_occupancy" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "_atom_site_occupancy")
    row = next(i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].lstrip().startswith("_"))
    lines[row] = lines[row].rsplit(None, 1)[0] + " 0.5"
    cif.write_text("\n".join(lines) + "\n")
    code, err = run(capsys, "fit", cif, files / "data.h5", "--out", tmp_path / "fit", "--shells", 1)
    assert code == 2 and "partial occupancy" in err


def test_intensity_at_bragg_peaks_is_warned_in_simulate_and_refused_in_fit(files, tmp_path, capsys):
    truth = ForceConstantModel(ni_conventional(), shells=1).set_from_bvk(TRUTH)
    hkl = [[2, 0, 0], [1, 1, 1 + 1e-9], [0.3, 0.1, 0.2]]
    with pytest.warns(UserWarning, match="2 of 3 hkl lie on Bragg peaks"):
        data = simulate(truth, hkl, 300.0, method="one-phonon", statistics="classical")
    with pytest.raises(ValueError, match="2 of the 3 used data points lie on Bragg peaks"):
        fit(truth, data, method="one-phonon", statistics="classical", progress=False)
    data.write(tmp_path / "peaks.h5")
    code, err = run(capsys, "fit", files / "Ni.cif", tmp_path / "peaks.h5", "--out", tmp_path / "fit", "--shells", 1,
                    "--bragg-radius", 0, "--start", files / "truth")
    assert code == 2 and "lie on Bragg peaks" in err and "--bragg-radius" in err


def test_nan_force_constants_are_refused():
    model = ForceConstantModel(bulk("Ni", "fcc", a=3.52), shells=1)
    with pytest.raises(ValueError, match="force constants must be finite numbers.*1XX"):
        model.set_from_bvk({"1XX": float("nan")})
    with pytest.raises(ValueError, match="must be finite"):
        model.set_parameters([np.inf, 0, 0])


def test_meaningless_uncertainties_make_a_fit_untrusted():
    assert _meaningless_sigma(["1XX", "1ZZ"], np.array([0.01, 0.02])) == ""
    note = _meaningless_sigma(["1XX", "1ZZ"], np.array([1e150, np.nan]))
    assert "1XX, 1ZZ" in note and "not error bars" in note


def test_an_absurd_temperature_does_not_end_converged_with_exit_0(files, tmp_path, capsys):
    code, err = run(capsys, *fit_args(files, tmp_path, "--temperature", 1e7))
    assert code != 0


# ---------------------------------------------------------------- late or unclear refusals
@pytest.mark.parametrize("extra, message", [
    (["--accuracy", 0], "--accuracy must be a relative error between 0 and 1"),
    (["--grid", 1, 1, -1], "--grid 1 1 -1: give three positive numbers"),
    (["--max-iter", -3], "--max-iter -3: give a positive number of iterations"),
    (["--first-fit-points", -1], "--first-fit-points -1: give a non-negative"),
    (["--bin", 0], "--bin 0: give a positive"),
])
def test_bad_numbers_are_refused_before_the_start(files, tmp_path, capsys, no_start, extra, message):
    code, err = run(capsys, *fit_args(files, tmp_path, *extra))
    assert code == 2 and message in err and "max_iter" not in err


def test_unwritable_out_and_checkpoint_are_refused_before_the_fit(files, tmp_path, capsys, no_start, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else access(path, mode))
    code, err = run(capsys, *fit_args(files, tmp_path)[:3], "--out", locked / "fit", *fit_args(files, tmp_path)[5:])
    assert code == 2 and f"--out {locked / 'fit'}: the folder {locked} is not writable" in err
    code, err = run(capsys, *fit_args(files, tmp_path, "--checkpoint", locked / "fit.ckpt"))
    assert code == 2 and "--checkpoint" in err and "not writable" in err


def test_all_points_masked_is_said_plainly(files, tmp_path, capsys):
    code, err = run(capsys, *fit_args(files, tmp_path, "--bragg-radius", 5))
    assert code == 2 and "zero-size" not in err and "masked" in err


def test_demo_with_no_points_is_refused(tmp_path, capsys):
    code, err = run(capsys, "demo", "--points", 0, "--out", tmp_path / "demo")
    assert code == 2 and "--points 0: give a positive number of Q points" in err


def test_a_data_file_given_as_force_constants_says_so(files, tmp_path, capsys):
    code, err = run(capsys, "simulate", files / "Ni.cif", "--fc", files / "data.h5", "--hkl", files / "hkl.txt",
                    "--temperature", 300, "--out", tmp_path / "x.h5")
    assert code == 2 and "is a TDS data file" in err and "without the crystal structure" not in err


def test_a_start_file_of_another_lattice_names_the_option_and_the_file(files, tmp_path, capsys):
    other = ForceConstantModel(bulk("Cu", "fcc", a=3.61, cubic=True), shells=1).set_from_bvk(TRUTH)
    write_phonopy_files(other, tmp_path / "copper")
    args = fit_args(files, tmp_path)
    args[args.index("--start") + 1] = tmp_path / "copper"
    code, err = run(capsys, *args)
    assert code == 2 and "--start" in err and "copper" in err


def test_debug_is_accepted_after_the_subcommand():
    parser = cli._parser()
    assert parser.parse_args(["demo", "--debug"]).debug and parser.parse_args(["--debug", "demo"]).debug
    assert not parser.parse_args(["demo"]).debug


def test_the_api_names_the_argument_instead_of_a_numpy_error():
    model = ForceConstantModel(bulk("Ni", "fcc", a=3.52), shells=1).set_from_bvk(TRUTH)
    with pytest.raises(ValueError, match=r"hkl must have shape \(N, 3\)"):
        model.q_from_hkl([1, 0])
    with pytest.raises(TypeError, match="temperature must be a number in K"):
        simulate(model, [[0.3, 0.1, 0.2]], temperature="300")
    with pytest.raises(TypeError, match="data must be a TDSData"):
        fit(model, None)
    with pytest.raises(ValueError, match="force constants are all zero"):
        simulate(ForceConstantModel(bulk("Ni", "fcc", a=3.52), shells=1), [[0.3, 0.1, 0.2]], 300.0)


def test_a_stalled_line_search_never_says_an_empty_reason():
    from types import SimpleNamespace

    from ase_tds.fitting.optimizers.lbfgs import lbfgs_status

    status = lbfgs_status(SimpleNamespace(status=2, message="", nit=3), np.array([1.0]), 10)
    assert "()" not in status["reason"] and "ABNORMAL" not in status["reason"]


def test_the_command_module_imports_no_torch_so_it_can_answer_a_ctrl_c_in_the_imports():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, ase_tds.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    assert out.strip() == "False"
