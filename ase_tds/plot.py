"""Plots people look at: phonon dispersions of fitted models, and the TDS fit (data, model, residual)."""

from __future__ import annotations

import warnings

import numpy as np
from matplotlib.figure import Figure

from .covariance import unstable_modes
from .structure import reciprocal_vectors


def dispersion_path(model, npoints: int = 200):
    """ASE's standard band path of the primitive cell: (q_cart (K, 3) Å⁻¹, x (K,), ticks, labels).

    A break in the path (two special points at one x) is one tick labelled as phonopy does, e.g. "K|U".

    Args:
        model (ForceConstantModel | PhonopyForceConstants): its `primitive` cell sets the path.
        npoints: number K of q points along the whole path.

    Returns:
        q (np.ndarray): Cartesian q (K, 3) Å⁻¹ along the path.
        x (np.ndarray): the path coordinate (K,) for plotting.
        ticks (list[float]): x of the special points.
        labels (list[str]): their names for the ticks, e.g. "X", "K|U" (Γ as matplotlib mathtext).
    """
    path = model.primitive.cell.bandpath(npoints=npoints)
    q = path.kpts @ reciprocal_vectors(model.primitive.cell[:])
    x, special_x, names = path.get_linear_kpoint_axis()
    ticks, labels = [], []
    for t, name in zip(special_x, names):
        name = r"$\Gamma$" if name == "G" else name
        if ticks and t == ticks[-1]:
            labels[-1] += "|" + name
        else:
            ticks.append(t)
            labels.append(name)
    return q, x, ticks, labels


def plot_dispersion(models: dict, path, title: str = "phonon dispersion", covariance=None) -> None:
    """Frequencies (THz) on the standard path for {name: ForceConstantModel}; the first one sets the path.

    The first is drawn as thick lines, the others thin and dashed on top of it, so that curves which agree
    stay visible. Imaginary modes are drawn as negative frequencies, as phonopy does, with a
    UserWarning naming the model. covariance: (n, n) (eV/Å²)² of the first model's θ (a fit's): its ±1σ band of
    frequencies (`uncertainty.frequency_sigma`) is shaded around it. Written as an image to `path` (format from
    its suffix, e.g. .png).

    Args:
        models: {name: ForceConstantModel or PhonopyForceConstants}, the legend's names; the first sets the path.
        path (str | Path): the image file; its suffix sets the format (.png, .svg, .pdf, ...).
        title: the plot's title.
        covariance (array_like | None): (n, n) (eV/Å²)² of the first model's θ; None = no ±1σ band.
    """
    first = next(iter(models.values()))
    q, x, ticks, labels = dispersion_path(first)
    segments = np.split(np.arange(len(x)), np.flatnonzero(np.diff(x) == 0) + 1)  # not joined across breaks
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    styles = ["--", "-.", ":"]
    lowest = 0.0
    for i, (name, model) in enumerate(models.items()):
        freq = model.frequencies(q)
        if unstable_modes(freq).any():
            warnings.warn(f"{name}: imaginary modes down to {freq.min():.3f} THz (dynamically unstable), drawn "
                          "below zero", UserWarning, stacklevel=2)
        lowest = min(lowest, freq.min())
        style = dict(ls="-", lw=3.5) if i == 0 else dict(ls=styles[(i - 1) % len(styles)], lw=1.5, zorder=2 + i)
        if i == 0 and covariance is not None:
            from .uncertainty import frequency_sigma

            band_sigma = frequency_sigma(model, q, covariance)
            for band in range(freq.shape[1]):
                for j, segment in enumerate(segments):
                    ax.fill_between(x[segment], (freq - band_sigma)[segment, band], (freq + band_sigma)[segment, band],
                                    color="C0", alpha=0.3, lw=0, zorder=1,
                                    label=f"{name} ± 1σ" if band == j == 0 else None)
        for band in range(freq.shape[1]):
            for j, segment in enumerate(segments):
                ax.plot(x[segment], freq[segment, band], color=f"C{i}", label=name if band == j == 0 else None,
                        **style)
    for t in ticks:
        ax.axvline(t, color="0.8", lw=0.8)
    ax.set_xticks(ticks, labels)
    ax.set_xlim(x[0], x[-1])
    if unstable_modes(lowest):
        ax.axhline(0, color="k", lw=0.8)
    else:
        ax.set_ylim(bottom=0)
    ax.set_ylabel("frequency (THz)")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def plot_tds_fit(q_norm, observed, model, sigma, path, title: str = "TDS fit") -> None:
    """Observed vs model intensity (e.u./atom) and normalised residuals against |Q| (Å⁻¹), used points only.

    The data are small dots drawn over the model's open circles: both stay visible where they agree.

    Args:
        q_norm (array_like): |Q| (N,) Å⁻¹ of the used points.
        observed (array_like): measured intensity (N,) e.u./atom (or the data's units).
        model (array_like): modelled intensity (N,), same units.
        sigma (array_like): 1σ of the data (N,), same units.
        path (str | Path): the image file; its suffix sets the format (.png, .svg, .pdf, ...).
        title: the plot's title.
    """
    q_norm, observed, model, sigma = (np.asarray(a, dtype=float) for a in (q_norm, observed, model, sigma))
    fig = Figure(figsize=(7, 8))
    top, mid, bottom = fig.subplots(3, 1, sharex=True)
    order = np.argsort(q_norm)
    top.plot(q_norm[order], model[order], "o", ms=4, mfc="none", mew=0.6, color="C3", label="model")
    top.plot(q_norm[order], observed[order], ".", ms=2, color="0.2", label="data")  # on top of the model
    top.set_yscale("log")
    top.set_ylabel("I (e.u./atom)")
    top.legend(markerscale=2)
    top.set_title(title)
    mid.plot(q_norm, model / observed - 1, ".", ms=2, color="C0")
    mid.set_ylabel("model/data − 1")
    bottom.plot(q_norm, (observed - model) / sigma, ".", ms=2, color="C2")
    bottom.axhline(0, color="k", lw=0.8)
    bottom.set_ylabel("(data − model)/σ")
    bottom.set_xlabel("|Q| (Å⁻¹)")
    _save(fig, path)


def plot_identifiability(combinations: list, path, title: str = "what the data determine") -> None:
    """The 1σ of each eigen-combination of θ (`uncertainty.parameter_combinations`, least determined first) as a
    fraction of the largest |θ|, log scale, with the line above which a combination counts as undetermined.

    Each bar is labelled with its combination of force constants. Written as an image to `path`.

    Args:
        combinations: list of dicts as `uncertainty.parameter_combinations` returns (keys relative,
            determined, text); an infinite 1σ is drawn at 1000.
        path (str | Path): the image file; its suffix sets the format (.png, .svg, .pdf, ...).
        title: the plot's title.
    """
    from .uncertainty import UNDETERMINED

    relative = np.array([c["relative"] for c in combinations], dtype=float)
    shown = np.where(np.isfinite(relative), relative, 1e3)
    fig = Figure(figsize=(12, 0.45 * len(combinations) + 1.6))
    ax = fig.subplots()
    y = np.arange(len(combinations))[::-1]
    colors = ["C3" if not c["determined"] else "C0" for c in combinations]
    ax.barh(y, shown, color=colors)
    ax.set_yticks(y, [c["text"] for c in combinations], fontsize=7)
    ax.set_xscale("log")
    ax.axvline(UNDETERMINED, color="k", ls="--", lw=1, label=f"undetermined above {UNDETERMINED:.0%}")
    ax.set_xlabel("1σ of the combination / largest |θ| (data alone)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def _save(fig: Figure, path) -> None:
    """Lay out and write a figure, format from the suffix of `path`.

    The figure is a bare `matplotlib.figure.Figure`, not one of pyplot's: no window opens, no pyplot state is
    touched, and the backend a user chose (interactive or not) stays as it is; saving needs no display.
    """
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_properties(props, path, title: str = "phonon properties ±1σ") -> None:
    """The phonon DOS, C_v(T), S(T) and F(T) of `props` (`ase_tds.properties.PhononProperties`), each with its ±1σ
    band (the ensemble's where there is one, else the linear one), the classical limit 3nR drawn with C_v and the
    ADPs U_iso ± 1σ in the title; the 1σ itself is drawn dashed on each panel's right axis. Written as an image to
    `path`.

    Args:
        props (PhononProperties): values and 1σ at θ̂.
        path (str | Path): the image file; its suffix sets the format (.png, .svg, .pdf, ...).
        title: the figure's title, before the ADPs.
    """
    from .properties import GAS_CONSTANT, sigma_text

    values, sigma, t = props.values, props.sigma, props.temperatures
    fig = Figure(figsize=(10, 7.5))
    axes = fig.subplots(2, 2)
    panels = ((axes[0, 0], "dos", props.frequency_points, "frequency (THz)", "DOS (states/THz per primitive cell)"),
              (axes[0, 1], "heat_capacity", t, "T (K)", "C_v (J/K/mol)"),
              (axes[1, 0], "entropy", t, "T (K)", "S (J/K/mol)"),
              (axes[1, 1], "free_energy", t, "T (K)", "F (kJ/mol)"))
    for ax, name, x, xlabel, ylabel in panels:
        ax.fill_between(x, values[name] - sigma[name], values[name] + sigma[name], color="C0", alpha=0.35, lw=0,
                        label="±1σ")
        ax.plot(x, values[name], color="C0", lw=1.2, label="fit")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        right = ax.twinx()  # the 1σ itself: a band of a well-determined fit is thinner than the line
        right.plot(x, sigma[name], color="C3", ls="--", lw=0.9)
        right.set_ylabel("1σ (dashed, same unit)", color="C3")
        right.tick_params(axis="y", colors="C3")
    axes[0, 1].axhline(3 * props.n_atoms * GAS_CONSTANT, color="k", ls="--", lw=0.8, label="3nR (classical)")
    axes[0, 1].legend(loc="lower right", fontsize=8)
    how = f"{props.ensemble['stable']}-member ensemble" if props.ensemble else "linear propagation"
    adps = ", ".join(f"{s}: {sigma_text(u, e)} Å²" for s, u, e in zip(props.symbols, values["adp_iso"],
                                                                       sigma["adp_iso"]))
    fig.suptitle(f"{title} ({how})\nU_iso at {props.adp_temperature:g} K ({props.statistics}): {adps}", fontsize=10)
    _save(fig, path)
