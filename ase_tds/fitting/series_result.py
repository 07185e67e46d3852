"""The result of a temperature series (`fitting.series`): the joint parameters with 1σ, θ and 1σ at every
temperature, χ² per file, and how it is written (fit.json, phonopy files per temperature, series.png)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import numpy as np

from ..atomic import write_atomic
from ..born import unit_of
from .result import versions


def series_labels(labels, series: str, temperatures) -> list[str]:
    """The labels of the joint parameters x: "1XX", …, "d1XX/dT", … ("linear"), or "1XX@300K", … per temperature
    ("independent")."""
    if series == "linear":
        return list(labels) + [f"d{label}/dT" for label in labels]
    return [f"{label}@{t:g}K" for t in temperatures for label in labels]


def series_units(labels, series: str, count: int) -> list[str]:
    """The units of the joint parameters of `series_labels` (θ's `labels` (n,), `count` temperatures): θ's, and per K
    for the linear series' slopes."""
    units = [unit_of(label) for label in labels]
    if series == "linear":
        return units + [f"{unit}/K" if unit else "1/K" for unit in units]
    return units * count


@dataclass
class SeriesResult:
    """A temperature series' fit: the joint parameters x with 1σ (sandwich of the joint Gauss–Newton matrix), θ with
    1σ at every measured temperature (propagated with the joint covariance), χ² per file; `save` writes them all.

    Attributes:
        series: "linear" (x = (θ₀, θ′), θ(T) = θ₀ + (T − T₀)·θ′) | "independent" (x = θ at each temperature).
        labels: θ's labels (n,), e.g. "1XX".
        parameter_labels: x's labels (p,): "1XX", …, "d1XX/dT", … | "1XX@300K", ….
        parameter_units: x's units (p,): "eV/Å²", …, "eV/Å²/K", ….
        parameters: x (p,): eV/Å² (θ₀, θ per temperature) and eV/Å²/K (θ′).
        sigma: 1σ of x (p,).
        covariance: of x (p, p).
        correlation: of x (p, p).
        reference_temperature: T₀, K.
        temperatures: the files' temperatures (m,) K, ascending.
        smoothness: s, eV/Å² per K, the independent series' prior width (None for "linear").
        files: one record per temperature (ascending): temperature, source, parameters (θ's label, value, 1σ, unit),
            covariance (n, n), scale, background, compton, chi2, n_points, chi2_per_point, deviance, settings (its
            forward model's, scale, the data's fingerprint), model_error, combinations (what the data determine of
            its θ, from the whole series).
        chi2: the series' χ² (all files).
        chi2_red: χ²/(N_used − p − the files' free nuisance values).
        n_points: the points used, all files.
        iterations: the optimiser's iterations.
        settings: method, statistics, background, compton, loss, optimizer, series, smoothness,
            reference_temperature (and "range" where the range was chosen by the data).
        warnings: the notes the fit warned with.
        history: the loss after each iteration.
        status: how the optimiser ended, {"converged": bool, "reason": text}.
        trusted: False where the model does not describe the data (joint χ² far above its expectation) or some 1σ
            are not finite: the 1σ are then no error bars.
        missing_physics: {} (a series does not diagnose what the model lacks: fit the file that misfits alone).
    """

    series: str
    labels: list
    parameter_labels: list
    parameter_units: list
    parameters: np.ndarray
    sigma: np.ndarray
    covariance: np.ndarray
    correlation: np.ndarray
    reference_temperature: float
    temperatures: np.ndarray
    smoothness: float | None
    files: list
    chi2: float
    chi2_red: float
    n_points: int
    iterations: int
    settings: dict
    warnings: list = field(default_factory=list)
    history: list = field(default_factory=list)
    status: dict = field(default_factory=dict)
    trusted: bool = True
    missing_physics: dict = field(default_factory=dict)

    @property
    def theta(self) -> np.ndarray:
        """θ (m, n) eV/Å² at each measured temperature."""
        return np.array([[p["value"] for p in record["parameters"]] for record in self.files])

    @property
    def theta_sigma(self) -> np.ndarray:
        """1σ (m, n) eV/Å² of θ at each measured temperature."""
        return np.array([[p["sigma"] for p in record["parameters"]] for record in self.files])

    @property
    def undetermined(self) -> bool:
        """Whether some 1σ of θ are not finite or absurdly large (`fitting.covariance.SIGMA_MEANINGLESS`)."""
        from .covariance import SIGMA_MEANINGLESS

        sigma = self.theta_sigma
        return bool(np.any(~np.isfinite(sigma) | (sigma > SIGMA_MEANINGLESS)))

    def theta_at(self, temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """θ (n,) eV/Å² and its covariance (n, n) at `temperature` (K): any temperature for "linear", a measured one
        for "independent".

        Raises:
            ValueError: an independent series at a temperature it did not measure.
        """
        n = len(self.labels)
        if self.series == "linear":
            a = np.hstack([np.eye(n), (temperature - self.reference_temperature) * np.eye(n)])
            return a @ self.parameters, a @ self.covariance @ a.T
        match = np.flatnonzero(np.isclose(self.temperatures, temperature, rtol=0, atol=1e-9))
        if not len(match):
            raise ValueError(f"an independent series has θ only at its temperatures "
                             f"{', '.join(f'{t:g}' for t in self.temperatures)} K, not at {temperature:g} K")
        record = self.files[int(match[0])]
        return self.theta[int(match[0])], np.array(record["covariance"])

    def table(self) -> str:
        """Plain-text table: θ ± 1σ per label at each temperature (θ₀ and θ′ first for "linear"), then each file's
        nuisance values and χ² per point, the joint χ²_red and how the optimiser ended."""
        n = len(self.labels)
        head = f"{'label':<12}"
        if self.series == "linear":
            head += f"{'θ₀ (T₀ = ' + format(self.reference_temperature, 'g') + ' K)':>24}{'θ′ per K':>24}"
        head += "".join(f"{format(t, 'g') + ' K':>24}" for t in self.temperatures)
        lines = [head]
        theta, sigma = self.theta, self.theta_sigma
        for k, label in enumerate(self.labels):
            line = f"{label:<12}"
            if self.series == "linear":
                line += f"{self.parameters[k]:>12.5f} ± {self.sigma[k]:<9.5f}"
                line += f"{self.parameters[n + k]:>12.3e} ± {self.sigma[n + k]:<9.2e}"
            line += "".join(f"{theta[i, k]:>12.5f} ± {sigma[i, k]:<9.5f}" for i in range(len(self.temperatures)))
            lines.append(line)
        for record in self.files:
            lines.append(f"{record['temperature']:g} K ({record['source']}): scale {record['scale']:.6g}, background "
                         f"{record['background']:.6g}, χ² per point {record['chi2_per_point']:.4g} on "
                         f"{record['n_points']} points")
        lines.append(f"{self.series} series: χ²_red {self.chi2_red:.4g} on {self.n_points} points")
        if self.status:
            lines.append(f"{'converged' if self.status['converged'] else 'NOT converged'} after {self.iterations} "
                         f"iterations: {self.status['reason']}")
        if not self.trusted:
            lines.append("NOT TRUSTED: the model does not describe the data (χ²_red far above 1) or some 1σ are not "
                         "finite, so these 1σ are not error bars")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """What fit.json holds: the series, T₀, the joint parameters (label, value, 1σ, unit) and their correlation,
        one record per temperature (θ with 1σ, its phonopy file, χ², nuisance values, settings), χ², settings,
        versions."""
        return {
            "series": self.series, "reference_temperature": self.reference_temperature,
            "temperatures": self.temperatures.tolist(), "smoothness": self.smoothness,
            "parameters": [{"label": k, "value": float(v), "sigma": float(s), "unit": u}
                           for k, v, s, u in zip(self.parameter_labels, self.parameters, self.sigma,
                                                 self.parameter_units)],
            "correlation": self.correlation.tolist(),
            "per_temperature": [dict(record, phonopy_file=phonopy_file_name(record["temperature"]))
                                for record in self.files],
            "chi2": self.chi2, "chi2_red": self.chi2_red, "n_points": self.n_points, "iterations": self.iterations,
            "status": self.status, "settings": self.settings, "warnings": self.warnings, "trusted": self.trusted,
            "versions": versions(),
        }

    def write_json(self, path) -> None:
        """Write `to_dict()` as JSON atomically.

        Args:
            path (str | Path): the file.
        """
        write_atomic(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))

    def save(self, folder, model, data, start=None, reference=None) -> None:
        """Write every output of the series into `folder` (created if needed), all or nothing: fit.json, per
        temperature T the fitted force constants as phonopy_params_{T}K.yaml and the data as data_{T}K.h5, and
        series.png (frequencies at the high-symmetry points against T with ±1σ bands). `ase-tds fit` with several
        data files writes its --out folder with this.

        Args:
            folder (str | Path): the output folder.
            model (ForceConstantModel): the fitted model (any θ: each file's θ is written into a copy).
            data (Sequence[TDSData]): the data fitted, in any order (matched by temperature).
            start (ForceConstantSource | None): the start's force constants, drawn in series.png (None: not drawn).
            reference (ForceConstantSource | None): reference force constants, drawn too (None: not drawn).
        """
        from pathlib import Path

        from ..atomic import write_files
        from ..io.phonopy import PARAMS_FILE, phonopy_writers
        from ..series_plot import plot_series

        by_temperature = {float(d.temperature): d for d in data}
        writers = {"fit.json": self.write_json}
        for t, theta in zip(self.temperatures, self.theta):
            fitted = copy.deepcopy(model).cpu().set_parameters(theta)
            writers[phonopy_file_name(t)] = phonopy_writers(fitted)[PARAMS_FILE]
            writers[data_file_name(t)] = by_temperature[float(t)].write
        others = {name: source for name, source in (("start", start), ("reference", reference)) if source is not None}
        writers["series.png"] = lambda path: plot_series(self, model, path, others)
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        write_files(out, writers)


def phonopy_file_name(temperature: float) -> str:
    """The phonopy file of the force constants at `temperature` (K) in a series' folder, e.g.
    phonopy_params_300K.yaml."""
    return f"phonopy_params_{temperature:g}K.yaml"


def data_file_name(temperature: float) -> str:
    """The data file of `temperature` (K) in a series' folder, e.g. data_300K.h5."""
    return f"data_{temperature:g}K.h5"


def series_outputs(temperatures) -> list[str]:
    """The names of the files a series of these temperatures (K) writes into its folder (`SeriesResult.save`)."""
    return ["fit.json", "series.png"] + [name(t) for t in temperatures for name in (phonopy_file_name, data_file_name)]
