"""Maps of reciprocal-space planes: the data, the fitted model and (data − model)/σ side by side.

A plane is written as its three hkl entries, two free letters and one fixed number, each in its own place: "h k 0.5"
is the plane l = 0.5, "h 0 l" is k = 0, "0.5 k l" is h = 0.5 (upper case and fractions such as 1/2 are accepted).
A plane holds the points of an axis's nearest layer where the points lie in layers along it (a volume's voxels), and
else (a scattered point list) those within a tolerance of it, PLANE_TOLERANCE r.l.u. by default. Maps are drawn in
r.l.u., each axis scaled by its reciprocal-lattice length (the skew of a non-orthogonal cell is not drawn): an image
where the plane's points fill a grid, coloured markers otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from .io.base import TDSError
from .plot import _save
from .structure import reciprocal_vectors

LETTERS = "hkl"
PLANE_TOLERANCE = 0.05  # r.l.u.: points of a scattered list this close to a plane are drawn in it
POINTS_PER_LAYER = 4  # points lie in layers along an axis when they share at most 1/POINTS_PER_LAYER as many values
MIN_MAP_POINTS = 50  # a plane with fewer used points is not one of the data's best-populated planes
MIN_MAP_SIDE = 5  # nor one whose points take fewer distinct values along either free axis
DECIMALS = 6  # coordinates equal to this many decimals (r.l.u.) are one layer


@dataclass(frozen=True)
class Plane:
    """The plane hkl[axis] = value of reciprocal space.

    Attributes:
        axis: the fixed index, 0, 1 or 2 (h, k or l).
        value: its value, r.l.u.
    """

    axis: int
    value: float

    @property
    def free(self) -> tuple[int, int]:
        """The two free indices, in order (e.g. (0, 1) for h and k)."""
        return tuple(i for i in range(3) if i != self.axis)

    @property
    def label(self) -> str:
        """The plane as it is written, e.g. "h k 0.5"."""
        return " ".join(f"{self.value:g}" if i == self.axis else LETTERS[i] for i in range(3))


def parse_plane(text: str, option: str = "plane") -> Plane:
    """The plane written as two free letters and one fixed number in their places: "h k 0.5", "h 0 l", "0.5 k l".

    Args:
        text: three entries separated by spaces (or commas); h, k, l in upper or lower case; the number may be a
            fraction such as 1/2.
        option: how error messages name the input (e.g. "--plane").

    Returns:
        The plane.

    Raises:
        ValueError: not three entries, not exactly one number, a letter out of its place, or a number that is not
            finite; the message shows the input and how to write it.
    """
    entries = str(text).replace(",", " ").split()
    how = "write two of h, k, l in their places and one number, e.g. 'h k 0.5', 'h 0 l' or '0.5 k l'"
    if len(entries) != 3:
        raise ValueError(f"{option} {text!r}: {len(entries)} entries; {how}")
    numbers = [i for i, entry in enumerate(entries) if entry.lower() not in LETTERS]
    if len(numbers) != 1:
        what = "no number" if not numbers else f"{len(numbers)} entries that are not h, k or l"
        raise ValueError(f"{option} {text!r}: {what}; {how}")
    axis = numbers[0]
    misplaced = [f"'{entries[i]}' in the place of {LETTERS[i]}" for i in range(3)
                 if i != axis and entries[i].lower() != LETTERS[i]]
    if misplaced:
        raise ValueError(f"{option} {text!r}: {', '.join(misplaced)}; {how}")
    try:
        value = float(Fraction(entries[axis]))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{option} {text!r}: '{entries[axis]}' is not a number; {how}") from None
    return Plane(axis, value)


def layers(values) -> np.ndarray | None:
    """The distinct values (sorted, r.l.u.) of one coordinate of the points if they lie in layers, else None."""
    values = np.round(np.asarray(values, dtype=float), DECIMALS)
    distinct = np.unique(values)
    return distinct if len(distinct) * POINTS_PER_LAYER <= len(values) else None


def in_plane(hkl, plane: Plane, tolerance: float | None = None) -> np.ndarray:
    """Which points (N, 3) r.l.u. lie in `plane`: its nearest layer, or those within `tolerance` r.l.u. of it.

    Args:
        hkl (array_like): the points (N, 3), r.l.u.
        plane: the plane.
        tolerance: r.l.u.; None = the nearest layer where the points lie in layers along the plane's axis (none if
            that is more than half a layer spacing, or PLANE_TOLERANCE for a single layer, away), else
            PLANE_TOLERANCE.

    Returns:
        (N,) bool.
    """
    x = np.round(np.asarray(hkl, dtype=float)[:, plane.axis], DECIMALS)
    values = layers(x) if tolerance is None else None
    if values is None:
        return np.abs(x - plane.value) <= (PLANE_TOLERANCE if tolerance is None else tolerance)
    nearest = values[np.argmin(np.abs(values - plane.value))]
    half_spacing = np.diff(values).min() / 2 if len(values) > 1 else PLANE_TOLERANCE
    return (x == nearest) & (abs(nearest - plane.value) <= half_spacing)


def best_planes(hkl, tolerance: float | None = None) -> list[Plane]:
    """The best-populated plane of each orientation, fullest first: those with MIN_MAP_POINTS points spread over
    MIN_MAP_SIDE values of each free index.

    Along an axis whose points lie in layers the candidates are the layers; else multiples of 2·tolerance (None:
    PLANE_TOLERANCE). Ties go to the plane nearest 0.

    Args:
        hkl (array_like): the points (N, 3), r.l.u.
        tolerance: r.l.u., as in `in_plane`.

    Returns:
        Up to three planes.
    """
    hkl = np.asarray(hkl, dtype=float)
    width = 2 * (PLANE_TOLERANCE if tolerance is None else tolerance)
    found = []
    for axis in range(3):
        x = np.round(hkl[:, axis], DECIMALS)
        if tolerance is None and layers(x) is not None:
            candidates, counts = np.unique(x, return_counts=True)
        else:
            bins, counts = np.unique(np.round(x / width), return_counts=True)
            candidates = bins * width
        _, _, value = max(zip(counts, -np.abs(candidates), candidates))
        plane = Plane(axis, float(value))
        points = hkl[in_plane(hkl, plane, tolerance)]
        spread = all(len(np.unique(np.round(points[:, i], DECIMALS))) >= MIN_MAP_SIDE for i in plane.free)
        if len(points) >= MIN_MAP_POINTS and spread:
            found.append((len(points), plane))
    return [plane for _, plane in sorted(found, key=lambda item: -item[0])]


def plot_plane_maps(maps: list[dict], path, cell=None, units: str | None = None) -> Figure:
    """One row per plane: data, model (one colour scale, log where positive) and (data − model)/σ; written to `path`.

    Args:
        maps: per plane a dict with plane (Plane), hkl (M, 3) r.l.u., observed (M,), model (M,), sigma (M,).
        path (str | Path): the image file; its suffix sets the format.
        cell (array_like | None): lattice vectors (3, 3) Å the hkl index, to scale each axis by its reciprocal
            length; None = 1 r.l.u. the same length on both axes.
        units: the intensities' units for the colour bar (None: arbitrary).

    Returns:
        The figure (its axes: the three panels of each row, then their colour bars).
    """
    lengths = np.ones(3) if cell is None else np.linalg.norm(reciprocal_vectors(cell), axis=1)
    fig = Figure(figsize=(14, 4.2 * len(maps)))
    panels = fig.subplots(len(maps), 3, squeeze=False)
    for row, entry in zip(panels, maps):
        plane, hkl = entry["plane"], np.asarray(entry["hkl"], dtype=float)
        observed, model = np.asarray(entry["observed"], dtype=float), np.asarray(entry["model"], dtype=float)
        sigma = np.asarray(entry["sigma"], dtype=float)
        residual = (observed - model) / np.where(sigma > 0, sigma, np.nan)  # σ = 0 (√|I| of I = 0): not drawn
        x, y = (hkl[:, i] for i in plane.free)
        intensity_norm = _intensity_norm(np.concatenate([observed, model]))
        shown = (lambda v: np.maximum(v, intensity_norm.vmin)) if isinstance(intensity_norm, LogNorm) else np.asarray
        finite = residual[np.isfinite(residual)]
        limit = max(3.0, float(np.percentile(np.abs(finite), 99))) if len(finite) else 3.0
        chi2 = float(np.mean(finite**2)) if len(finite) else np.nan
        for ax, values, norm, cmap, title, label in (
                (row[0], shown(observed), intensity_norm, "viridis", "data", f"I ({units or 'arb. units'})"),
                (row[1], shown(model), intensity_norm, "viridis", "model", f"I ({units or 'arb. units'})"),
                (row[2], residual, Normalize(-limit, limit), "RdBu_r", "(data − model)/σ",
                 f"(data − model)/σ; χ²/N = {chi2:.3g}")):
            drawn = _draw(ax, x, y, values, norm, cmap)
            fig.colorbar(drawn, ax=ax, label=label, shrink=0.85)
            ax.set_title(f"{title} · {plane.label}")
            ax.set_xlabel(f"{LETTERS[plane.free[0]]} (r.l.u.)")
            ax.set_ylabel(f"{LETTERS[plane.free[1]]} (r.l.u.)")
            ax.set_aspect(lengths[plane.free[1]] / lengths[plane.free[0]])
    _save(fig, path)
    return fig


def draw_plane_maps(model, result, data, path, planes: list[Plane] | None = None,
                    tolerance: float | None = None) -> Figure:
    """Maps of the used points of `data` against the fitted model of the data (`FitResult.calculated` of I(Q) from
    `model` under the fit's settings), in `planes` (None: `best_planes` of the used points).

    Args:
        model (ForceConstantModel): the fitted force constants.
        result (FitResult): the fit's result (its settings and `calculated`).
        data (TDSData): the data fitted (its mask: the points used).
        path (str | Path): the image file.
        planes: the planes, one row each; None = the data's best-populated planes.
        tolerance: r.l.u., as in `in_plane`.

    Returns:
        The figure (`plot_plane_maps`).

    Raises:
        TDSError: no plane to draw, or a plane without used points (the message names the data's best planes).
    """
    import torch

    from .forward import from_settings

    used = np.flatnonzero(data.mask)
    hkl = data.hkl[used]
    best = best_planes(hkl, tolerance)
    planes = best if planes is None else planes
    filled = ", ".join(f"'{plane.label}'" for plane in best) or "none"
    if not planes:
        raise TDSError(f"{data.source}: no plane holds {MIN_MAP_POINTS} used points spread over it; name a plane, or "
                       "draw the points against |Q| (tds_fit.png) instead")
    selections = []
    for plane in planes:
        chosen = used[in_plane(hkl, plane, tolerance)]
        if len(chosen) == 0:
            raise TDSError(f"{data.source}: no used point lies in the plane '{plane.label}'; the best-populated "
                           f"planes of the data are {filled}")
        selections.append(chosen)
    points = np.unique(np.concatenate(selections))
    tds = from_settings(model, result.settings)
    with torch.no_grad():
        intensity = tds(data.q[points]).cpu().numpy()
    calculated = result.calculated(intensity, data.q_norm[points])  # at the sorted `points`
    sigma = data.sigma if data.sigma is not None else np.sqrt(np.abs(data.intensity))
    maps = [dict(plane=plane, hkl=data.hkl[chosen], observed=data.intensity[chosen],
                 model=calculated[np.searchsorted(points, chosen)], sigma=sigma[chosen])
            for plane, chosen in zip(planes, selections)]
    return plot_plane_maps(maps, path, cell=data.cell, units=data.units)


def _intensity_norm(values: np.ndarray) -> Normalize:
    """A log colour scale over the 1st–99.9th percentile of the positive values, or linear where none is > 0."""
    positive = values[values > 0]
    if len(positive):
        low, high = np.percentile(positive, [1, 99.9])
        if high > low:
            return LogNorm(low, high)
    return Normalize(values.min(), values.max())


def _draw(ax, x, y, values, norm, cmap):
    """An image where the points (x, y) lie on a regular grid (its empty cells blank), else coloured markers."""
    columns, rows = _regular(x), _regular(y)
    if columns is not None and rows is not None:
        (x_centres, column), (y_centres, row) = columns, rows
        cells = row * len(x_centres) + column
        if len(np.unique(cells)) == len(x) and len(x) * POINTS_PER_LAYER >= len(x_centres) * len(y_centres):
            image = np.full((len(y_centres), len(x_centres)), np.nan)
            image[row, column] = values
            return ax.pcolormesh(x_centres, y_centres, np.ma.masked_invalid(image), norm=norm, cmap=cmap,
                                 shading="nearest")
    return ax.scatter(x, y, c=values, norm=norm, cmap=cmap, s=float(np.clip(4000 / len(x), 2, 40)), linewidths=0)


def _regular(values) -> tuple[np.ndarray, np.ndarray] | None:
    """(centres (n,), index (M,)) of the regular grid, spaced as the closest distinct values, that holds every value
    (M,) r.l.u.; None for fewer than two distinct values or values off such a grid."""
    distinct = np.unique(np.round(values, DECIMALS))
    if len(distinct) < 2:
        return None
    step = np.diff(distinct).min()
    index = np.round((values - distinct[0]) / step).astype(int)
    if np.abs(distinct[0] + index * step - values).max() > 10.0**-DECIMALS * max(1, index.max()):
        return None
    return distinct[0] + step * np.arange(index.max() + 1), index
