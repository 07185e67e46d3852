"""Plane maps: the plane parser, the points of a plane (volumes and scattered lists), and `ase-tds plot FITDIR` drawing
data, model and (data − model)/σ side by side."""

from pathlib import Path

import numpy as np
import pytest

from ase_tds import ForceConstantModel, simulate, tds_model
from ase_tds.cli import main
from ase_tds.fitting import FitResult
from ase_tds.io.base import TDSError
from ase_tds.io.phonopy import write_phonopy_files
from ase_tds.maps import (PLANE_TOLERANCE, Plane, best_planes, draw_plane_maps, in_plane, parse_plane,
                          plot_plane_maps)

from conftest import ni_conventional

SETTINGS = dict(method="one-phonon", statistics="classical", dw_mesh=4)


@pytest.mark.parametrize("text, plane", [
    ("h k 0.5", Plane(2, 0.5)), ("H 0 L", Plane(1, 0.0)), ("0.5 k l", Plane(0, 0.5)), ("h,k,1/2", Plane(2, 0.5)),
    ("  h  -1  l ", Plane(1, -1.0)),
])
def test_planes_are_parsed(text, plane):
    assert parse_plane(text) == plane
    assert parse_plane(plane.label) == plane


@pytest.mark.parametrize("text, message", [
    ("h k", "2 entries"), ("h k l", "no number"), ("h 1 2", "2 entries that are not h, k or l"),
    ("k h 0", "'k' in the place of h, 'h' in the place of k"), ("h k x", "'x' is not a number"),
    ("h k 1/0", "'1/0' is not a number"), ("h k inf", "'inf' is not a number"),
])
def test_bad_planes_say_how_to_write_one(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_plane(text, "--plane")
    said = str(error.value)
    assert said.startswith(f"--plane {text!r}") and "e.g. 'h k 0.5', 'h 0 l' or '0.5 k l'" in said


def grid(h, k, l):
    return np.stack(np.meshgrid(h, k, l, indexing="ij"), axis=-1).reshape(-1, 3)


def test_the_points_of_a_plane():
    volume = grid(np.arange(-1, 1.01, 0.1), np.arange(0, 1.01, 0.1), np.arange(0, 1.01, 0.25))
    layer = in_plane(volume, Plane(2, 0.5))
    np.testing.assert_array_equal(layer, np.isclose(volume[:, 2], 0.5))
    np.testing.assert_array_equal(in_plane(volume, Plane(2, 0.55)), layer)  # the nearest layer
    assert not in_plane(volume, Plane(2, 1.2)).any()  # more than half a spacing beyond the last layer
    np.testing.assert_array_equal(in_plane(volume, Plane(0, -0.3)), np.isclose(volume[:, 0], -0.3))
    scattered = np.random.default_rng(0).uniform(-2, 2, (3000, 3))
    np.testing.assert_array_equal(in_plane(scattered, Plane(1, 0.5)), np.abs(scattered[:, 1] - 0.5) <= PLANE_TOLERANCE)
    np.testing.assert_array_equal(in_plane(volume, Plane(2, 0.5), tolerance=0.3),
                                  np.abs(volume[:, 2] - 0.5) <= 0.3)


def test_best_planes_are_the_fullest_of_each_orientation():
    volume = grid(np.arange(-1, 1.01, 0.1), np.arange(0, 1.51, 0.1), np.arange(0, 1.01, 0.25))
    thinned = volume[~((volume[:, 2] != 0.75) & (np.arange(len(volume)) % 3 == 0))]  # l = 0.75 the fullest layer
    planes = best_planes(thinned)
    assert planes[0] == Plane(2, 0.75) and {p.axis for p in planes} == {0, 1, 2}
    single = grid(np.arange(0, 2, 0.1), np.arange(0, 2, 0.1), [0.5])  # one plane of data: its other cuts are lines
    assert best_planes(single) == [Plane(2, 0.5)]
    assert best_planes(np.random.default_rng(0).uniform(-3, 3, (200, 3))) == []  # too sparse to map


def test_a_map_has_data_model_and_residual_panels(tmp_path):
    hkl = grid(np.arange(0, 1, 0.1), np.arange(0, 1, 0.1), [0.5])
    observed = 1.0 + hkl[:, 0]
    maps = [dict(plane=Plane(2, 0.5), hkl=hkl, observed=observed, model=observed, sigma=0.1 * observed),
            dict(plane=Plane(0, 0.2), hkl=hkl[:, [2, 0, 1]], observed=observed, model=1.1 * observed,
                 sigma=0.1 * observed)]
    fig = plot_plane_maps(maps, tmp_path / "maps.png")
    assert (tmp_path / "maps.png").read_bytes().startswith(b"\x89PNG")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["data · h k 0.5", "model · h k 0.5", "(data − model)/σ · h k 0.5",
                      "data · 0.2 k l", "model · 0.2 k l", "(data − model)/σ · 0.2 k l"]
    assert len(fig.axes) == 12  # each panel with its colour bar


@pytest.fixture(scope="module")
def fit_folder(tmp_path_factory):
    """A fit folder (phonopy files, fit.json, data.h5) whose model is the truth that simulated the data: a volume of
    three l layers, Bragg neighbourhoods masked."""
    folder = tmp_path_factory.mktemp("maps")
    truth = ForceConstantModel(ni_conventional(), shells=1).set_from_bvk({"1XX": 1.54, "1ZZ": -0.055, "1XY": 1.59})
    hkl = grid(np.arange(-0.95, 1.0, 0.1), np.arange(0.05, 2.0, 0.1), [0.0, 0.5, 1.0])
    data = simulate(truth, hkl, 300.0, method="one-phonon", statistics="classical", tds_options=dict(dw_mesh=4))
    data = data.mask_bragg(0.15, structure=ni_conventional())
    data.write(folder / "data.h5")
    settings = tds_model(truth, 300.0, **SETTINGS).settings()
    n = len(truth.labels)
    FitResult(labels=truth.labels, theta=truth.theta.detach().numpy(), sigma=np.full(n, 0.01),
              covariance=1e-4 * np.eye(n), correlation=np.eye(n), scale=1.0, background=0.0, chi2=0.0, chi2_red=0.0,
              n_points=data.n_used, iterations=1, settings=settings).write_json(folder / "fit.json")
    write_phonopy_files(truth, folder)
    return folder, data


def keep_figures(monkeypatch) -> list:
    """The figures the plots draw from now on, kept instead of rendered (the files hold a placeholder)."""
    figures = []
    for module in ("ase_tds.plot", "ase_tds.maps"):
        monkeypatch.setattr(f"{module}._save", lambda fig, path: (figures.append(fig), Path(path).write_bytes(b"-")))
    return figures


def test_plot_draws_the_best_planes_and_any_plane(fit_folder, tmp_path, capsys, monkeypatch):
    folder, data = fit_folder
    figures = keep_figures(monkeypatch)
    assert main(["plot", str(folder), "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    assert (tmp_path / "tds_maps.png").is_file()
    titles = [ax.get_title() for ax in figures[-1].axes if ax.get_title().startswith("data")]
    assert titles == [f"data · {plane.label}" for plane in best_planes(data.hkl[data.mask])]
    assert main(["plot", str(folder), "--out", str(tmp_path), "--plane", "h k 0.5", "--plane", "0.05 k l"]) == 0
    assert (tmp_path / "tds_plane_h_k_0.5.png").is_file() and (tmp_path / "tds_plane_0.05_k_l.png").is_file()
    data_panel, model_panel, residual_panel = figures[-2].axes[:3]
    assert residual_panel.get_title() == "(data − model)/σ · h k 0.5"
    layer = data.mask & np.isclose(data.hkl[:, 2], 0.5)
    drawn = data_panel.collections[0].get_array()
    assert drawn.count() == layer.sum()  # the layer's used points; masked and other layers blank
    shown = np.sort(np.maximum(data.intensity[layer], data_panel.collections[0].norm.vmin))  # the log scale's floor
    np.testing.assert_allclose(np.sort(drawn.compressed()), shown)
    # the model (the truth that simulated the data, re-evaluated from the folder) is the data
    np.testing.assert_allclose(np.sort(model_panel.collections[0].get_array().compressed()), shown, rtol=1e-8)
    assert np.abs(residual_panel.collections[0].get_array().compressed()).max() < 1e-6


def test_plot_refuses_a_bad_plane_in_one_line(fit_folder, tmp_path, capsys):
    folder, data = fit_folder
    assert main(["plot", str(folder), "--out", str(tmp_path), "--plane", "h h 0"]) == 2
    err = capsys.readouterr().err
    assert "--plane 'h h 0': 'h' in the place of k" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before anything is drawn
    with pytest.raises(TDSError, match="no used point lies in the plane 'h k 7'; the best-populated planes of the "
                                       "data are 'h k"):
        draw_plane_maps(None, None, data, tmp_path / "maps.png", [Plane(2, 7.0)])  # refused before the model is used


def test_plane_needs_a_fit_folder(fit_folder, tmp_path, capsys):
    folder, _ = fit_folder
    assert main(["plot", str(folder / "phonopy_params.yaml"), "--out", str(tmp_path), "--plane", "h k 0"]) == 2
    assert "--plane maps a fit's data and model: give the folder" in capsys.readouterr().err
