"""The inversion: fit force constants θ to measured TDS — the driver that joins the pieces of `ase_tds.fitting`.

Model of the data: m(Q) = s · I(Q; θ) + b + A · c(|Q|) (`objective`). Optimiser: L-BFGS (scipy) for the
deterministic models, Adam for "sampling" (or L-BFGS: a seeded sampler's loss is deterministic), both in coordinates
whitened by the Gauss–Newton matrix at the start (`optimizers`). A step that makes the crystal dynamically unstable
is rejected (the line search backtracks; Adam backs off), never turned into NaN. A start that is already unstable is
refused (`diagnosis`).
"""

from __future__ import annotations

import warnings

import numpy as np
from tqdm.auto import tqdm

from .. import distributed
from ..data import TDSData
from ..forward import model_class, tds_model
from ..structure import BRAGG_TOLERANCE, on_bragg_peaks
from .checkpoint import Checkpoint
from .covariance import finer_model_needed, fitted_result
from .diagnosis import named_if_unstable
from . import missing
from .first_fit import first_fit
from .objective import LOSSES, Objective, fingerprint, fixed_noise, set_theta
from .optimizers import Optimizer, minimise
from .result import FitResult
from .starts import StartContext, set_start


def fit(model, data: TDSData, *, temperature: float | None = None, method: str = "gaussian",
        statistics: str = "quantum", scale: str | None = None, background: str = "free", compton=False,
        loss: str = "chi2", exposure=None, optimizer: str | Optimizer | None = None,
        prior_sigma: float | None = None, checkpoint=None, tds_options: dict | None = None, progress: bool = True,
        start: str | None = None, explain_misfit: bool = True) -> FitResult:
    """Fit `model` (a ForceConstantModel, fitted in place from its current θ) to `data`; options by keyword.

    Model of the data: s·I(Q; θ) + b + A·c(|Q|) (`ase_tds.fitting.objective`); the nuisance values are eliminated
    at every θ.

    Args:
        model (ForceConstantModel): the model to fit; its θ is the start (unless `start` names another) and holds
            the fitted values afterwards.
        data (TDSData | Sequence[TDSData]): the TDSData; its mask selects the points used. A list of them at
            different temperatures is a temperature series, fitted jointly by `fitting.series.fit_series` (the
            linear series; its result a `SeriesResult`; temperature, prior_sigma, checkpoint and explain_misfit are
            single-file options).
        temperature: K; None = the data's own temperature (`TDSData.temperature`).
        method: the forward model, "gaussian" (all orders, converged by default) | "one-phonon" | "sampling".
        statistics: "quantum" | "classical".
        scale: "free" | "fixed" (needs absolute data, units "e.u./atom") | None (fixed for absolute data, free
            otherwise).
        background: "free" (a constant) | "none".
        compton (bool | Callable): False | True (Hubbell's incoherent scattering of the crystal's atoms,
            `ComptonShape`, with a free amplitude) | callable(|Q| Å⁻¹ ndarray) → e.u./atom (e.g.
            `ComptonShape(symbols, energy_kev=20)`).
        loss: "chi2" | "poisson". The Poisson deviance needs the counts n = t·I_obs.
        exposure (float | array_like | None): t (counts per unit of intensity, scalar or (N,)) for
            loss="poisson"; None infers t = I_obs/σ² per point, exact when σ is pure counting error √n/t (as
            `add_poisson_noise` writes), and t = 1/σ where I_obs = 0 (its σ = 1 count convention).
        optimizer (Optimizer | str | None): an `Optimizer` (method, max_iter, rtol, gtol, atol, learning_rate), its
            method alone (a name of `OPTIMIZERS`: "lbfgs" | "adam"), or None (L-BFGS, Adam for "sampling"; 200
            iterations).
        prior_sigma: eV/Å², a ridge towards the start θ₀: Σ_k ((θ_k − θ₀_k)/prior_sigma)² is added to the loss
            (and 1/prior_sigma² to the Gauss–Newton matrix), so that combinations the data do not determine stay
            near the start (their 1σ then ≈ prior_sigma) while the determined ones converge. None: no prior. Either
            way the fit names the combinations the data alone leave undetermined (`FitResult.combinations`).
        checkpoint (str | Path | None): a JSON file written after every iteration; if it exists, the fit resumes
            from it (same model labels, settings and data, else ValueError): L-BFGS restarts its memory there,
            Adam continues exactly.
        tds_options: extra forward-model arguments (grid, accuracy, dw_mesh, form_factors, sampler, ...). The gaussian
            model chooses its grid for the data's largest |Q| (`converged_grid`) and estimates its own error on
            every point (`ForwardModel.discretisation_error`); a point where it exceeds a fifth of σ moves to a larger
            crystal (at most twice), and what remains is added to the variance of every point (a warning says so;
            `FitResult.model_error` records it). Those are chosen at the start θ: where at the fitted θ the error
            exceeds σ/5 on more points than at the start, or `accuracy` (relative) by more than there, the fit
            goes on from that θ once, with the grid and crystals chosen there (`settings["refit"]` records the
            first pass; a checkpoint holds the first pass only). The 1σ carry twice the error at the fitted θ as
            one error shared by all points (the shift it gives θ), which more points do not average away. For
            "sampling" give a sampler with a seed (common random numbers make the loss a smooth function of θ), and
            many samples rather than many points: points with one q of the supercell share its sampled modes (a
            warning says 1σ takes the points' errors as independent).
        progress: progress bars (tqdm) for the iterations and, for large data, the chunks of each evaluation.
        start: a named start (`ase_tds.fitting.STARTS`: "springs", "emt", "zero", "calculator:module.Class", or a
            phonopy file) that sets the model's θ before the fit; None: the model's own θ.
        explain_misfit: where the model does not describe the data (`FitResult.trusted` False), refit it extended
            by each piece of physics it may lack and name the likeliest (`fitting.missing`, a warning,
            `FitResult.missing_physics`).

    Returns:
        FitResult: θ, 1σ (Gauss–Newton sandwich, the model's own error and misfit included), correlations, what
        the data determine, χ² and the settings; `model.theta` holds the fitted values (a SeriesResult for a list of
        data).

    Raises:
        UnstableError: the start is dynamically unstable.
        ValueError: an unknown option, too few points for the parameters, a checkpoint of another fit, or data
            that cannot take the options (e.g. scale="fixed" on data in arbitrary units).
    """
    if isinstance(data, (list, tuple)):  # several files at their own temperatures: a temperature series
        from .series import fit_series

        single = [name for name, value in (("temperature", temperature), ("prior_sigma", prior_sigma),
                                           ("checkpoint", checkpoint)) if value is not None]
        if single:
            raise ValueError(f"{', '.join(single)}: not for a temperature series (each file is fitted at its own "
                             "temperature); fit one file at a time for that, or leave it out")
        return fit_series(model, data, method=method, statistics=statistics, scale=scale, background=background,
                          compton=compton, loss=loss, exposure=exposure, optimizer=optimizer, tds_options=tds_options,
                          progress=progress, start=start)
    optimizer = Optimizer.of(optimizer).for_method(method)
    scale = checked_options(model, data, method, scale, loss, prior_sigma, tds_options)
    temperature = data.require_temperature(temperature)
    progress = progress and distributed.is_main()
    if start is not None:
        set_start(model, start, StartContext(data, temperature, statistics, progress=progress,
                                             say=tqdm.write if progress else None))
    options = dict(temperature=temperature, method=method, statistics=statistics, scale=scale, background=background,
                   compton=compton, loss=loss, exposure=exposure, optimizer=optimizer, tds_options=tds_options,
                   progress=progress)
    prior = None if prior_sigma is None else (model.theta.detach().cpu().numpy().copy(), float(prior_sigma))
    with warnings.catch_warnings(record=True) as caught:  # the first pass's notes stand only if it is the last
        warnings.simplefilter("always")
        result = _fit_pass(model, data, prior=prior, checkpoint=checkpoint, subset_first=True, **options)
    if finer_model_needed(result.model_error, result.settings.get("accuracy")):
        first = dict(grid=result.settings.get("grid"), iterations=result.iterations, chi2_red=result.chi2_red,
                     model_error={k: result.model_error.get(k) for k in ("max_relative", "fraction_above_fifth_sigma",
                                                                          "points_on_larger_crystals")})
        if progress:
            tqdm.write("at the fitted θ the grid and crystals chosen at the start are too coarse: fitting on from "
                       "there with them chosen anew")
        result = _fit_pass(model, data, prior=prior, checkpoint=None, subset_first=False, **options)
        result.settings["refit"] = dict(first_pass=first, reason="the model's own error at the first pass's θ "
                                        "exceeded σ/5 on more points, or the accuracy by more, than at the start θ")
    else:
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if explain_misfit:
        explain(model, data, result, {k: v for k, v in options.items() if k != "progress"}, progress)
    return result


def _fit_pass(model, data: TDSData, *, temperature: float, method: str, statistics: str, scale: str, background: str,
              compton, loss: str, exposure, optimizer: Optimizer, prior, checkpoint, tds_options, progress: bool,
              subset_first: bool) -> FitResult:
    """One pass of `fit` from the model's θ: the forward model built there (the gaussian model's grid and crystals
    chosen at that θ), a first fit on a subset where `subset_first` and the model allows it, the fit of all the
    points, and its FitResult. `prior` (θ₀, σ_p) or None."""
    original = model.theta.detach().cpu().numpy().copy()
    options = dict(tds_options or {})
    options.setdefault("q_max", float(data.q_norm[np.asarray(data.mask, dtype=bool)].max()))
    options.setdefault("voxels", data.q[np.asarray(data.mask, dtype=bool)])  # on a regular grid: the fft route
    with named_if_unstable(model, original):  # the gaussian model chooses its grid at the start θ
        tds = tds_model(model, temperature, method=method, statistics=statistics, **options)
    if progress and tds.name != method:
        tqdm.write(f"forward model: {tds.settings()['route']}")
    settings = _settings(tds, data, scale, background, compton, loss, optimizer, None if prior is None else prior[1])
    saver = Checkpoint(checkpoint, model.labels, settings) if checkpoint is not None else None
    state = saver.load(optimizer.strategy.State) if saver is not None else None
    if state is not None and progress:
        tqdm.write(f"resuming from iteration {state.iterations} of {checkpoint}")
    objective = _objective(tds, data, scale, background, loss, compton, exposure, prior, progress, original, state,
                           saver)
    theta, first = original, None
    if state is None and subset_first and tds.supports_subset:
        with named_if_unstable(model, original):  # the one-phonon model meets an unstable start only here
            theta, first = first_fit(objective, data, exposure, optimizer, original, progress)
    if state is None:
        state = _fresh_state(objective, optimizer, theta, original, first is not None)
    else:
        _evaluate_start(objective, state.theta, original, f" (θ from the checkpoint {checkpoint})")
    state, status = minimise(objective, optimizer, state, saver=saver, progress=progress, rewhiten=objective.whitening)
    settings = dict(settings, first_fit=first) if first else settings  # for the record, not the checkpoint
    with fixed_noise(tds):
        return fitted_result(objective, state.theta, state.iterations, state.history, status, settings, compton)


def explain(model, data: TDSData, result: FitResult, options: dict, progress: bool = True) -> None:
    """Where the fitted model misses the data (`result.trusted` False) and is deterministic, name what it most likely
    lacks (`missing.diagnose`): into `result.missing_physics`, its warnings and a Python warning. Nothing otherwise.

    Args:
        model (ForceConstantModel): the fitted model (its θ is left as fitted).
        data: the data fitted.
        result: the fit's result (updated in place).
        options: the fit's keyword arguments (temperature, method, statistics, scale, background, compton, loss,
            exposure, optimizer, tds_options).
        progress: say what is being done.
    """
    if result.trusted or model_class(options.get("method", "gaussian")).monte_carlo:
        return
    if progress:
        tqdm.write("the model misses the data: refitting it with more range and with dipole forces to see which helps")
    theta = model.theta.detach().clone()
    result.missing_physics = missing.diagnose(model, data, result, options)
    set_theta(model, theta)
    text = missing.note(result.missing_physics)
    result.warnings.append(text)
    warnings.warn(text, stacklevel=3)


def checked_options(model, data: TDSData, method: str, scale, loss: str, prior_sigma, tds_options) -> str:
    """Refuse options the fit cannot take, before any work; returns the scale ("fixed" for absolute data when
    None). Public: `fit`, `fit_series` and `refine.refine` check their options with it.

    Raises:
        TypeError: data that are not a TDSData.
        ValueError: no used point, used points on Bragg peaks, an unknown loss or scale, a bad prior_sigma, a fixed
            scale on relative data, a cell that differs from the model's, an unseeded sampler under torchrun.
    """
    if not isinstance(data, TDSData):
        raise TypeError(f"data must be a TDSData (e.g. TDSData.read(path)), got {type(data).__name__}")
    used = np.asarray(data.mask, dtype=bool)
    if not used.any():
        raise ValueError(f"no point of the {len(used)} data points is used: every one is masked (the file's mask, or "
                         "within the Bragg radius of a peak: a smaller mask_bragg radius, the CLI's --bragg-radius)")
    peaks = int(on_bragg_peaks(data.q[used], model.primitive.cell[:]).sum())
    if peaks:
        raise ValueError(f"{peaks} of the {int(used.sum())} used data points lie on Bragg peaks (within "
                         f"{BRAGG_TOLERANCE:g} r.l.u. of a reciprocal-lattice vector), where the diffuse model is not "
                         "defined apart from the peak; mask them (data.mask_bragg(radius), the CLI's --bragg-radius)")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if prior_sigma is not None and not (np.isfinite(prior_sigma) and prior_sigma > 0):
        raise ValueError(f"prior_sigma must be a positive width in eV/Å² (or None: no prior), got {prior_sigma!r}")
    if scale is None:
        scale = "fixed" if data.absolute else "free"
    if scale not in ("fixed", "free"):
        raise ValueError(f"scale must be 'fixed', 'free' or None (fixed for absolute data), got {scale!r}")
    if scale == "fixed" and not data.absolute:
        raise ValueError("scale='fixed' needs absolute data (units 'e.u./atom'); the data are in arbitrary units — "
                         "use scale='free'")
    if data.cell is not None:
        data.check_cell(model.unitcell.cell[:], "the model's structure")
    sampler = (tds_options or {}).get("sampler")
    if model_class(method).monte_carlo and distributed.size() > 1 and sampler is not None and sampler.seed is None:
        raise ValueError("under torchrun every rank must draw the same displacements: give the sampler a seed "
                         "(e.g. QSpaceSampler(..., seed=0)), or run without torchrun")
    return scale


def _settings(tds, data: TDSData, scale: str, background: str, compton, loss: str, optimizer: Optimizer,
              prior_sigma) -> dict:
    """The fit's settings record (FitResult.settings; a checkpoint of other settings is refused)."""
    return dict(tds.settings(), scale=scale, background=background,
                compton=compton if isinstance(compton, bool) else "callable", loss=loss, optimizer=optimizer.method,
                prior_sigma=prior_sigma, data=fingerprint(data))


def _objective(tds, data, scale, background, loss, compton, exposure, prior, progress, original, state,
               saver) -> Objective:
    """The loss of all the points, its weights measured at the start: the gaussian model's own error at the θ given
    (`original`), the sampling model's Monte-Carlo variance (χ²) at the first start of the fit (a checkpoint's record
    of it, else the checkpoint's θ or the θ given), which the checkpoint then records."""
    theta, where = original, ""
    if tds.monte_carlo and loss == "chi2":
        if state is not None:
            theta = state.theta if saver.monte_carlo_theta is None else saver.monte_carlo_theta
            where = f" (θ from the checkpoint {saver.path})"
        theta = np.asarray(theta, dtype=float)
        if saver is not None:
            saver.monte_carlo_theta = theta
    with named_if_unstable(tds.force_constants, theta, original, where):
        objective = Objective(tds, data, scale, background, loss, compton, exposure, theta=theta, prior=prior,
                              progress=progress)
    if tds.monte_carlo and tds.sampler.seed is None:
        warnings.warn("the sampler has no seed: every evaluation draws new displacements, so the loss is noisy and "
                      "Adam anneals on that noise; give it a seed (common random numbers) for a smooth loss",
                      stacklevel=3)
    return objective


def _evaluate_start(objective: Objective, theta: np.ndarray, original: np.ndarray, where: str) -> float:
    """The loss at the optimiser's start θ; an unstable θ is refused naming `where` it came from."""
    with named_if_unstable(objective.tds.force_constants, theta, original, where):
        return objective.evaluate(theta)[0]


def _fresh_state(objective: Objective, optimizer: Optimizer, theta: np.ndarray, original: np.ndarray,
                 after_first_fit: bool):
    """The optimiser's state at θ (the given start, or the first fit's minimum): its loss and whitening there."""
    value = _evaluate_start(objective, theta, original, " (θ of the first fit)" if after_first_fit else "")
    return optimizer.strategy.start(theta, objective.whitening(theta), [value], optimizer)
