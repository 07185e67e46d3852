"""The picture of a temperature series (`fitting.series`): phonon frequencies at the high-symmetry points against
temperature, with their ±1σ bands."""

from __future__ import annotations

import copy

import numpy as np
from matplotlib.figure import Figure

from .plot import _save
from .structure import reciprocal_vectors
from .uncertainty import frequency_sigma

# temperatures drawn across a linear series' range
CURVE_TEMPERATURES = 33
# at most this many high-symmetry points (one panel each)
MAX_PANELS = 8


def special_points(model) -> tuple[list[str], np.ndarray]:
    """The high-symmetry points of the standard band path of the model's primitive cell, Γ left out: (names,
    Cartesian q (K, 3) Å⁻¹), in the order the path first visits them, at most MAX_PANELS."""
    from ase.dft.kpoints import parse_path_string

    path = model.primitive.cell.bandpath(npoints=0)
    names = []
    for name in (name for segment in parse_path_string(path.path) for name in segment):
        if name != "G" and name not in names:
            names.append(name)
    names = names[:MAX_PANELS]
    reduced = np.array([path.special_points[name] for name in names])
    return names, reduced @ reciprocal_vectors(model.primitive.cell[:])


def series_frequencies(result, model, temperatures) -> tuple[np.ndarray, np.ndarray]:
    """(ν (T, K, 3n) THz, 1σ (T, K, 3n) THz) at the special points at each of `temperatures` (K), from θ(T) and its
    covariance (`SeriesResult.theta_at`, first-order propagation `uncertainty.frequency_sigma`)."""
    _, q = special_points(model)
    work = copy.deepcopy(model).cpu()
    freqs, sigmas = [], []
    for t in temperatures:
        theta, cov = result.theta_at(t)
        work.set_parameters(theta)
        freqs.append(work.frequencies(q))
        sigmas.append(frequency_sigma(work, q, cov))
    return np.array(freqs), np.array(sigmas)


def plot_series(result, model, path, others: dict | None = None) -> None:
    """series.png: the frequencies (THz) at each high-symmetry point (one panel each) against temperature (K), with
    ±1σ bands: across the whole range for a linear series (its measured temperatures marked), at the measured
    temperatures for an independent one (error bars).

    Args:
        result (SeriesResult): the series' fit.
        model (ForceConstantModel): a model of the crystal with the fit's labels (its θ is not used).
        path (str | Path): the image file; its suffix sets the format.
        others (dict | None): {name: ForceConstantSource} drawn as dashed lines at their (temperature-independent)
            frequencies, e.g. the start or a reference.
    """
    names, q = special_points(model)
    linear = result.series == "linear"
    measured = np.asarray(result.temperatures, dtype=float)
    temperatures = np.linspace(measured.min(), measured.max(), CURVE_TEMPERATURES) if linear else measured
    freq, sigma = series_frequencies(result, model, temperatures)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(3.2 * columns, 3.0 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for k, (name, ax) in enumerate(zip(names, axes)):
        for band in range(freq.shape[2]):
            label = "fitted ± 1σ" if band == 0 else None
            if linear:
                low, high = freq[:, k, band] - sigma[:, k, band], freq[:, k, band] + sigma[:, k, band]
                ax.fill_between(temperatures, low, high, color="C0", alpha=0.3, lw=0)
                ax.plot(temperatures, freq[:, k, band], color="C0", lw=1.5, label=label)
            else:
                ax.errorbar(temperatures, freq[:, k, band], yerr=sigma[:, k, band], color="C0", marker="o", ms=3,
                            capsize=3, lw=1.2, label=label)
        for i, (other, source) in enumerate((others or {}).items()):
            for band, value in enumerate(source.frequencies(q[k:k + 1])[0]):
                ax.axhline(value, color=f"C{i + 1}", ls="--", lw=1, label=other if band == 0 else None)
        if linear:
            for t in measured:
                ax.axvline(t, color="0.8", lw=0.8, zorder=0)
        ax.set_title(name)
        ax.set_xlabel("temperature (K)")
        ax.set_ylabel("frequency (THz)")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    what = (f"linear series, T₀ = {result.reference_temperature:g} K; measured at grey lines" if linear
            else "independent series")
    fig.suptitle(f"frequencies against temperature ({what})", fontsize=10)
    _save(fig, path)
