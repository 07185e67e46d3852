"""Plots people look at: phonon dispersions of fitted models, and the TDS fit (data, model, residual)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def dispersion_path(model, npoints: int = 200):
    """ASE's standard band path of the primitive cell: (q_cart (K, 3) Å⁻¹, x (K,), ticks, labels)."""
    path = model.primitive.cell.bandpath(npoints=npoints)
    q = 2 * np.pi * path.kpts @ np.linalg.inv(np.array(model.primitive.cell[:])).T
    x, ticks, labels = path.get_linear_kpoint_axis()
    return q, x, ticks, [r"$\Gamma$" if s == "G" else s for s in labels]


def plot_dispersion(models: dict, path, title: str = "phonon dispersion") -> None:
    """Frequencies (THz) on the standard path for {name: ForceConstantModel}; the first one sets the path.

    Written as an image to `path` (format from its suffix, e.g. .png).
    """
    first = next(iter(models.values()))
    q, x, ticks, labels = dispersion_path(first)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, (name, model) in enumerate(models.items()):
        freq = model.frequencies(q)
        for band in range(freq.shape[1]):
            ax.plot(x, freq[:, band], styles[i % len(styles)], color=f"C{i}", lw=1.5,
                    label=name if band == 0 else None)
    for t in ticks:
        ax.axvline(t, color="0.8", lw=0.8)
    ax.set_xticks(ticks, labels)
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("frequency (THz)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tds_fit(q_norm, observed, model, sigma, path, title: str = "TDS fit") -> None:
    """Observed vs model intensity (e.u./atom) and normalised residuals against |Q| (Å⁻¹), used points only.

    q_norm, observed, model, sigma: (N,) arrays of the used points; written as an image to `path`.
    """
    q_norm, observed, model, sigma = (np.asarray(a, dtype=float) for a in (q_norm, observed, model, sigma))
    fig, (top, mid, bottom) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    order = np.argsort(q_norm)
    top.plot(q_norm[order], observed[order], ".", ms=2, color="0.4", label="data")
    top.plot(q_norm[order], model[order], ".", ms=2, color="C3", label="model")
    top.set_yscale("log")
    top.set_ylabel("I (e.u./atom)")
    top.legend(markerscale=4)
    top.set_title(title)
    mid.plot(q_norm, model / observed - 1, ".", ms=2, color="C0")
    mid.set_ylabel("model/data − 1")
    bottom.plot(q_norm, (observed - model) / sigma, ".", ms=2, color="C2")
    bottom.axhline(0, color="k", lw=0.8)
    bottom.set_ylabel("(data − model)/σ")
    bottom.set_xlabel("|Q| (Å⁻¹)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
