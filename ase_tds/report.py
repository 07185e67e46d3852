"""What a fit leaves on disk: its folder (phonopy files, fit.json, the data, plots), written all or nothing, and the
TDS model that a fit's recorded settings describe (to redraw it later)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .atomic import write_files

# tds_fit.png draws at most this many points
DRAWN_POINTS = 20000


def draw_tds_fit(model, result, data, path) -> None:
    """tds_fit.png: the used points of `data` against the fitted model of the data, `result.calculated` (scale,
    background and Compton term) of I(Q) from `model` under the fit's settings (its sampler for "sampling").

    Above DRAWN_POINTS used points (a whole volume) an evenly spaced subset of them is drawn, and the title says so.

    Args:
        model (ForceConstantModel): the fitted force constants.
        result (FitResult): the fit's result (its settings and `calculated`).
        data (TDSData): the data fitted (its mask: the points used).
        path (str | Path): the image file.
    """
    from .forward import from_settings
    from .plot import plot_tds_fit

    tds = from_settings(model, result.settings)
    used = np.nonzero(np.asarray(data.mask, dtype=bool))[0]
    title = "TDS fit"
    if len(used) > DRAWN_POINTS:  # a whole volume: an evenly spaced subset reads the same and draws in seconds
        title = f"TDS fit ({DRAWN_POINTS} of {len(used)} points drawn)"
        used = used[np.linspace(0, len(used) - 1, DRAWN_POINTS).astype(int)]
    with torch.no_grad():
        intensity = tds(data.q[used]).cpu().numpy()
    calc = result.calculated(intensity, data.q_norm[used])
    sigma = data.sigma[used] if data.sigma is not None else np.sqrt(np.abs(data.intensity[used]))
    plot_tds_fit(data.q_norm[used], data.intensity[used], calc, sigma, path, title=title)


def write_fit_folder(folder, model, result, data, start=None, reference=None) -> None:
    """Write every output of a fit into `folder` (created if needed): phonopy_params.yaml, FORCE_CONSTANTS and
    force_constants.hdf5, fit.json, data.h5, dispersion.png (with its ±1σ band), identifiability.png, tds_fit.png.

    All or nothing (`ase_tds.atomic.write_files`): every file is written under a temporary name and renamed once
    all are complete; an error leaves the folder's files as they were.

    Args:
        folder (str | Path): the output folder.
        model (ForceConstantModel): the fitted force constants.
        result (FitResult): its result.
        data (TDSData): the data fitted (its mask: the points used).
        start (ForceConstantSource | None): the start's force constants, drawn in dispersion.png (None: not
            drawn).
        reference (ForceConstantSource | None): reference force constants (e.g. PhonopyForceConstants of DFT),
            drawn too (None: not drawn).
    """
    from .io.phonopy import phonopy_writers
    from .plot import plot_dispersion, plot_identifiability

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    curves = {"fitted": model}
    if start is not None:
        curves["start"] = start
    if reference is not None:
        curves["reference"] = reference
    writers = dict(phonopy_writers(model), **{
        "fit.json": result.write_json,
        "data.h5": data.write,
        "dispersion.png": lambda path: plot_dispersion(curves, path, covariance=result.covariance),
        "identifiability.png": lambda path: plot_identifiability(result.combinations, path),
        "tds_fit.png": lambda path: draw_tds_fit(model, result, data, path),
    })
    write_files(out, writers)
