"""A temperature series: several data files at different temperatures fitted jointly (docs/theory.md, "Temperature
series").

Each file keeps what a single fit gives it (`Objective`): its own forward model at its own temperature, on its own
copy of the force-constant model, and its own nuisance terms (scale, background, Compton amplitude), profiled at
every θ. What the files share is the joint parameter vector x (p,), mapped to file i's θ_i (n,) by a fixed matrix,
θ_i = A_i x:

- "linear" (the default): x = (θ₀, θ′), θ(T) = θ₀ + (T − T₀)·θ′, so A_i = [1, (T_i − T₀)·1]; T₀ the mean of the
  files' temperatures (or given);
- "independent": x = (θ_1, …, θ_m), A_i picks its own block, and a smoothness prior on the slope between
  neighbouring temperatures, Σ_i Σ_k ((θ_{i+1,k} − θ_{i,k}) / (s·(T_{i+1} − T_i)))², s eV/Å² per K (`smoothness`),
  ties them where the data leave them loose.

The loss is L(x) = Σ_i L_i(A_i x) (+ the prior), its gradient Σ_i A_iᵀ ∇L_i (the chain rule); the Gauss–Newton matrix
and the sandwich of the covariance are assembled the same way (J_x = J_θ·A_i per file, each file's nuisance values a
block of their own), so the optimisers (`minimise`) and the covariance (`fitting.covariance`) are those of a single
fit.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import numpy as np
from tqdm.auto import tqdm

from .. import distributed
from ..covariance import UnstableError
from ..data import TDSData
from ..forward import model_class, tds_model
from ..io.base import TDSError
from . import model_error
from .covariance import SIGMA_MEANINGLESS, final_evaluation, sandwich, theta_covariance
from .diagnosis import identifiability, unstable_start
from .fit import checked_options
from .objective import Objective, fingerprint, set_theta
from .optimizers import Optimizer, minimise
from .series_result import SeriesResult, series_labels, series_units
from .starts import StartContext, set_start

SERIES = ("linear", "independent")
SMOOTHNESS = 1e-3  # eV/Å² per K: the default width of the independent series' prior on the slope between neighbours


def reference_temperature(temperatures) -> float:
    """T₀ (K) of a series when none is given: the mean of the files' temperatures (K)."""
    return float(np.mean(np.asarray(temperatures, dtype=float)))


def nearest_file(data, temperature: float) -> int:
    """The index of the file of `data` (a sequence of TDSData) whose temperature is nearest `temperature` (K)."""
    return int(np.argmin([abs(d.temperature - temperature) for d in data]))


class SeriesObjective:
    """The joint loss of a temperature series and its gradient, for the optimisers: the files' objectives summed
    through the maps θ_i = A_i x (module docstring).

    Args:
        objectives (list[Objective]): one per file, ordered by temperature.
        temperatures (array_like): (m,) K, ascending.
        series: "linear" | "independent".
        reference: T₀, K (the linear series' θ₀ is θ(T₀)).
        smoothness: s, eV/Å² per K, the independent series' prior width (None for "linear").
    """

    def __init__(self, objectives, temperatures, series: str, reference: float, smoothness: float | None):
        self.objectives, self.series, self.reference, self.smoothness = objectives, series, reference, smoothness
        self.temperatures = np.asarray(temperatures, dtype=float)
        n, m = objectives[0].n_theta, len(objectives)
        self.n_theta = n
        if series == "linear":
            self.maps = [np.hstack([np.eye(n), (t - reference) * np.eye(n)]) for t in self.temperatures]
            self.precision = np.zeros((2 * n, 2 * n))
        else:
            self.maps = [np.kron(np.eye(m)[i], np.eye(n)) for i in range(m)]
            slopes = np.kron(np.diff(np.eye(m), axis=0) / (smoothness * np.diff(self.temperatures))[:, None],
                             np.eye(n))  # ((m−1)·n, m·n): (θ_{i+1} − θ_i) / (s·ΔT_i)
            self.precision = slopes.T @ slopes  # the prior Σ(…)² = xᵀPx

    @property
    def n_total(self) -> int:
        """The points of all the files."""
        return sum(objective.n_total for objective in self.objectives)

    @property
    def n_params(self) -> int:
        """p, the length of the joint parameter vector x."""
        return self.maps[0].shape[1]

    def thetas(self, x) -> list[np.ndarray]:
        """θ_i = A_i x (n,) eV/Å² of every file, for the joint x (p,)."""
        return [a @ np.asarray(x, dtype=float) for a in self.maps]

    def evaluate(self, x: np.ndarray):
        """(loss, ∂loss/∂x (p,), [β_i of each file]) at x; raises UnstableError where a file's crystal is unstable."""
        value, grad, betas = float(x @ self.precision @ x), 2 * self.precision @ x, []
        for objective, a, theta in zip(self.objectives, self.maps, self.thetas(x)):
            part, part_grad, beta = objective.evaluate(theta)
            value, grad = value + part, grad + a.T @ part_grad
            betas.append(beta)
        return value, grad, betas

    def whitening(self, x: np.ndarray) -> np.ndarray:
        """R (p, p) with RᵀR ≈ the joint Gauss–Newton matrix N = Σ_i A_iᵀ N_i A_i + P at x (each file's N_i from its
        subset of points, `Objective.whitening`, brought to all its points), the prior's P included.

        Every direction keeps at least 10⁻⁶ of the largest curvature, as in a single fit, but measured in the basis
        scaled to unit diagonal, D⁻¹ N D⁻¹ (D = √diag N): θ′ (per K) has curvatures (ΔT)² ~ 10⁴ times θ₀'s, and a
        floor taken from them would stiffen θ₀'s weakly determined directions until L-BFGS crawled along them."""
        normal = self.precision.copy()
        for objective, a, theta in zip(self.objectives, self.maps, self.thetas(x)):
            r = objective.whitening(theta)
            normal += objective.n_total / min(256, objective.n_total) * a.T @ (r.T @ r) @ a
        d = np.sqrt(np.clip(np.diag(normal), 1e-300, None))
        scaled = normal / np.outer(d, d)
        scaled += 1e-6 * np.linalg.eigvalsh(scaled)[-1] * np.eye(len(scaled))
        return np.linalg.cholesky(scaled).T * d  # RᵀR = D (D⁻¹ N D⁻¹ + floor) D

    def final(self, x: np.ndarray) -> tuple[SimpleNamespace, list[SimpleNamespace]]:
        """(the joint final evaluation, each file's `final_evaluation`) at x.

        The joint one holds, over (x, β_1, …, β_m): the Gauss–Newton matrix `normal` and the residuals' `middle`
        (each file's lifted by J ↦ J·L_i, L_i = A_i on x and the identity on its own β_i; the prior's P added to both,
        as one more measurement), the model error's `systematic` JᵀW·e summed over the files (one error shared by all
        points), χ² and n_free, as `theta_covariance` takes them; `normal_data` is `normal` without the prior.
        """
        p, n = self.n_params, self.n_theta
        finals = [final_evaluation(objective, theta) for objective, theta in zip(self.objectives, self.thetas(x))]
        size = p + sum(f.n_free - n for f in finals)
        normal, middle, systematic = np.zeros((size, size)), np.zeros((size, size)), np.zeros(size)
        offset = p
        for a, f in zip(self.maps, finals):
            k = f.n_free - n
            lift = np.zeros((f.n_free, size))
            lift[:n, :p] = a
            lift[n:, offset:offset + k] = np.eye(k)
            normal += lift.T @ f.normal @ lift
            middle += lift.T @ f.middle @ lift
            systematic += lift.T @ f.systematic
            offset += k
        normal_data = normal.copy()
        normal[:p, :p] += self.precision
        middle[:p, :p] += self.precision
        joint = SimpleNamespace(normal=normal, middle=middle, systematic=systematic, normal_data=normal_data,
                                chi2=sum(f.chi2 for f in finals), n_free=size)
        return joint, finals


def fit_series(model, data, *, series: str = "linear", smoothness: float | None = None,
               reference_temperature: float | None = None, method: str = "gaussian", statistics: str = "quantum",
               scale: str | None = None, background: str = "free", compton=False, loss: str = "chi2", exposure=None,
               optimizer: str | Optimizer | None = None, tds_options: dict | None = None, progress: bool = True,
               start: str | None = None) -> SeriesResult:
    """Fit `model` to data files at different temperatures jointly (module docstring); `fit(model, [a, b, c])` calls
    this with its defaults.

    Each file is modelled at its own temperature (`TDSData.temperature`) with its own scale, background and Compton
    amplitude (profiled, as in `fit`); the force constants are shared through the series.

    Args:
        model (ForceConstantModel): its θ is the start (unless `start` names another); afterwards it holds θ(T₀)
            ("linear") or the θ of the file nearest T₀ ("independent").
        data (Sequence[TDSData]): two or more data sets, each with its own temperature, no two at the same one.
        series: "linear": θ(T) = θ₀ + (T − T₀)·θ′; "independent": one θ per temperature with the smoothness prior.
        smoothness: s, eV/Å² per K, the width of the independent series' prior on the slope (θ_{i+1} − θ_i)/ΔT
            between neighbouring temperatures: small s ties them together, large s leaves each file to itself.
            None: SMOOTHNESS (10⁻³ eV/Å²/K) for "independent"; not for "linear".
        reference_temperature: T₀, K; None: the mean of the files' temperatures.
        method: the forward model, "gaussian" | "one-phonon" (the sampling model fits one temperature at a time).
        statistics: "quantum" | "classical".
        scale: "free" | "fixed" | None (fixed for each file in e.u./atom, free for the others); each file its own.
        background: "free" (a constant per file) | "none".
        compton (bool | Callable): as for `fit`; each file its own amplitude.
        loss: "chi2" | "poisson".
        exposure (Sequence | None): for loss="poisson", one exposure per file (each as `fit` takes it), or None.
        optimizer (Optimizer | str | None): as for `fit`.
        tds_options (dict | None): forward-model options for every file, as for `fit` (the gaussian model chooses its
            grid per file).
        progress: progress bars.
        start (str | None): a named start (as for `fit`), set on the data of the file nearest T₀; None: the model's
            own θ.

    Returns:
        SeriesResult: the joint parameters with 1σ, θ and 1σ at every temperature, χ² per file, the settings.

    Raises:
        TDSError: a file without a temperature.
        ValueError: fewer than two files, two at one temperature, an unknown or unfit option (the message names the
            file where it is one file's).
        UnstableError: the start is dynamically unstable at some temperature.
    """
    data = _checked_series(data, series, smoothness, method, exposure)
    progress = progress and distributed.is_main()
    order = np.argsort([d.temperature for d in data])
    data = [data[i] for i in order]
    exposure = [None] * len(data) if exposure is None else [exposure[i] for i in order]
    temperatures = np.array([d.temperature for d in data])
    reference = _reference(reference_temperature, temperatures)
    if series == "independent" and smoothness is None:
        smoothness = SMOOTHNESS
    optimizer = Optimizer.of(optimizer).for_method(method)
    scales = [_for_file(d, lambda: checked_options(model, d, method, scale, loss, None, tds_options)) for d in data]
    if start is not None:
        near = data[nearest_file(data, reference)]
        set_start(model, start, StartContext(near, near.temperature, statistics, progress=progress,
                                             say=tqdm.write if progress else None))
    original = model.theta.detach().cpu().numpy().copy()
    objectives = [_objective(model, d, t, original, method, statistics, s, background, loss, compton, e, tds_options,
                             progress) for d, t, s, e in zip(data, temperatures, scales, exposure)]
    joint = SeriesObjective(objectives, temperatures, series, reference, smoothness)
    x = np.concatenate([original, np.zeros_like(original)]) if series == "linear" else np.tile(original, len(data))
    try:
        value = joint.evaluate(x)[0]
    except UnstableError as err:
        raise unstable_start(model, original, original, err, "") from err
    state = optimizer.strategy.start(x, joint.whitening(x), [value], optimizer)
    state, status = minimise(joint, optimizer, state, progress=progress, label=f"series fit, {len(data)} temperatures",
                             rewhiten=joint.whitening)
    settings = dict(method=method, statistics=statistics, background=background,
                    compton=compton if isinstance(compton, bool) else "callable", loss=loss,
                    optimizer=optimizer.method, series=series, smoothness=smoothness, reference_temperature=reference)
    result = series_result(joint, state.theta, state.iterations, state.history, status, settings, data)
    near = nearest_file(data, reference)
    set_theta(model, result.parameters[:model.n_params] if series == "linear" else result.theta[near])
    return result


def series_result(joint: SeriesObjective, x, iterations: int, history, status: dict, settings: dict,
                  data) -> SeriesResult:
    """The SeriesResult at the fitted x (p,): the joint sandwich covariance (Birge-scaled by the joint χ²_red where the
    model misses the data, as a single fit), θ and its covariance at each temperature, each file's record, and the
    notes (also warned)."""
    x = np.asarray(x, dtype=float)
    fc, p = joint.objectives[0].tds.force_constants, joint.n_params
    final, finals = joint.final(x)
    n_points = sum(objective.n_total for objective in joint.objectives)
    cov, share, misfit = theta_covariance(final, p, n_points, None)
    sigma = np.sqrt(np.clip(np.diag(cov), 0, None))
    safe = np.where(sigma > 0, sigma, 1.0)
    data_cov = sandwich(final.normal_data, final.normal_data)[:p, :p]  # what the data alone determine
    files, notes = [], []
    for a, objective, f, d in zip(joint.maps, joint.objectives, finals, data):
        files.append(_file_record(objective, f, d, a @ cov @ a.T, a @ data_cov @ a.T, a @ x, share))
        notes += [f"at {d.temperature:g} K the data do not determine {c['text']}: 1σ {c['sigma']:.3g} eV/Å² from the "
                  "data alone" for c in files[-1]["combinations"] if not c["determined"]]
    labels = series_labels(fc.labels, joint.series, joint.temperatures)
    scale_free = any(objective.scale_mode == "free" for objective in joint.objectives)
    notes += [note for note in identifiability(labels, cov / np.outer(safe, safe), final.normal[:p, :p],
                                               "free" if scale_free else "fixed", [], None)]
    notes += [misfit] if misfit else []
    theta_sigma = np.array([[row["sigma"] for row in record["parameters"]] for record in files])
    meaningless = not np.all(np.isfinite(theta_sigma) & (theta_sigma <= SIGMA_MEANINGLESS))
    if meaningless:
        notes.append(f"some 1σ are not finite or above {SIGMA_MEANINGLESS:g} eV/Å²: the data do not determine them, "
                     "so the fit's uncertainties are not error bars")
    for text in notes:
        warnings.warn(text, stacklevel=3)
    dof = max(n_points - final.n_free, 1)
    return SeriesResult(series=joint.series, labels=list(fc.labels), parameter_labels=labels,
                        parameter_units=series_units(fc.labels, joint.series, len(joint.temperatures)), parameters=x,
                        sigma=sigma, covariance=cov, correlation=cov / np.outer(safe, safe),
                        reference_temperature=joint.reference, temperatures=joint.temperatures.copy(),
                        smoothness=joint.smoothness, files=files, chi2=final.chi2, chi2_red=final.chi2 / dof,
                        n_points=n_points, iterations=iterations, settings=settings, warnings=notes,
                        history=[float(h) for h in history], status=status, trusted=not misfit and not meaningless)


def _file_record(objective, final: SimpleNamespace, data: TDSData, cov: np.ndarray, data_cov: np.ndarray,
                 theta: np.ndarray, share: np.ndarray) -> dict:
    """One file's record in a SeriesResult: its θ with 1σ and covariance, nuisance values, χ², what its θ's data
    determine (from the whole series), its forward model's settings and own error."""
    from ..born import unit_of
    from ..uncertainty import parameter_combinations

    fc = objective.tds.force_constants
    sigma = np.sqrt(np.clip(np.diag(cov), 0, None))
    record = dict(objective.model_error)
    if objective.tds.has_grid:  # the gaussian model's own error at the fitted θ, as a single fit records it
        import torch

        scatter = 1.0 / torch.sqrt(objective.data_w) / abs(final.values["scale"])
        record = dict(record, at_fit=model_error.record(torch.abs(final.shift), final.intensity, scatter),
                      largest_share_of_variance=float(np.clip(share, 0.0, 1.0).max()))
    return {"temperature": float(data.temperature), "source": data.source,
            "parameters": [{"label": k, "value": float(v), "sigma": float(s), "unit": unit_of(k)}
                           for k, v, s in zip(fc.labels, theta, sigma)],
            "covariance": cov.tolist(), "scale": final.values["scale"], "background": final.values["background"],
            "compton": final.values["compton"], "chi2": final.chi2, "n_points": objective.n_total,
            "chi2_per_point": final.chi2 / objective.n_total, "deviance": final.deviance,
            "settings": dict(objective.tds.settings(), scale=objective.scale_mode, data=fingerprint(data)),
            "model_error": record,
            "combinations": parameter_combinations(fc.labels, theta, np.linalg.pinv(data_cov))}


def _checked_series(data, series: str, smoothness, method: str, exposure) -> list:
    """The data as a list, refused where it is no series: fewer than two sets, one without a temperature, two at one
    temperature; and the series options checked."""
    if isinstance(data, TDSData) or not all(isinstance(d, TDSData) for d in data):
        raise TypeError("a temperature series takes a list of TDSData (e.g. [TDSData.read(path) for path in paths])")
    data = list(data)
    if len(data) < 2:
        raise ValueError(f"a temperature series needs two or more data sets at different temperatures, got "
                         f"{len(data)}; fit a single file with fit(model, data)")
    for d in data:
        if d.temperature is None:
            raise TDSError(f"{d.source}: field 'temperature' is missing; a temperature series models each file at "
                           "its own temperature: add the attribute temperature (K) to the file")
    seen = {}
    for d in data:
        if d.temperature in seen:
            raise ValueError(f"{seen[d.temperature]} and {d.source} are both at {d.temperature:g} K; a temperature "
                             "series takes one data set per temperature: merge them into one file, or fit them "
                             "separately")
        seen[d.temperature] = d.source
    if series not in SERIES:
        raise ValueError(f"series must be one of {SERIES}, got {series!r}")
    if smoothness is not None and series != "independent":
        raise ValueError("smoothness (--smoothness) is the prior of series='independent' (--series independent); "
                         "give that series, or leave smoothness out")
    if smoothness is not None and not (np.isfinite(smoothness) and smoothness > 0):
        raise ValueError(f"smoothness must be a positive width in eV/Å² per K, e.g. {SMOOTHNESS:g}; got {smoothness!r}")
    if model_class(method).monte_carlo:
        raise ValueError(f"the {method} model fits one temperature at a time (its sampler is drawn at one "
                         "temperature); fit a series with method='gaussian' or 'one-phonon'")
    if exposure is not None and (not isinstance(exposure, (list, tuple)) or len(exposure) != len(data)):
        raise ValueError(f"exposure: give one per data set ({len(data)}), or None")
    return data


def _reference(given, temperatures: np.ndarray) -> float:
    """T₀ (K): the one given, checked, or the mean of the temperatures."""
    if given is None:
        return reference_temperature(temperatures)
    if not (np.isfinite(given) and given > 0):
        raise ValueError(f"reference_temperature must be a positive temperature in K, got {given!r}")
    return float(given)


def _for_file(data: TDSData, work):
    """work(), its ValueError naming the file `data` came from."""
    try:
        return work()
    except TDSError:  # names its file already
        raise
    except ValueError as err:
        raise ValueError(f"{data.source}: {err}") from err


def _objective(model, data: TDSData, temperature: float, original, method: str, statistics: str, scale: str,
               background: str, loss: str, compton, exposure, tds_options, progress: bool) -> Objective:
    """One file's objective: its own copy of the model, its forward model at its temperature (the gaussian model's
    grid chosen at the start θ for its |Q|), its weights measured at the start."""
    own = copy.deepcopy(model)
    options = dict(tds_options or {})
    options.setdefault("q_max", float(data.q_norm[np.asarray(data.mask, dtype=bool)].max()))
    where = f" at {temperature:g} K ({data.source})"
    try:
        tds = tds_model(own, temperature, method=method, statistics=statistics, **options)
        return _for_file(data, lambda: Objective(tds, data, scale, background, loss, compton, exposure,
                                                 theta=original, progress=progress))
    except UnstableError as err:
        raise unstable_start(model, original, original, err, where) from err
