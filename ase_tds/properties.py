"""Phonon properties with error bars, from a fit's θ ~ N(θ̂, Σ).

    props = phonon_properties(model, covariance, temperature=300.0, ensemble=1000)
    props.values["heat_capacity"], props.sigma["heat_capacity"]      # (T,) J/K/mol and its 1σ
    write_properties("fit_out/")                                      # properties.json and properties.png

For each θ the force constants Φ(θ) go to phonopy, which gives the total DOS (tetrahedron method), C_v(T), S(T) and
F(T) (`run_mesh`, `run_total_dos`, `run_thermal_properties`: the numbers are phonopy's, per mole of primitive
cells); the atomic displacement parameters U_ij (Å², Cartesian, at the fit's temperature and statistics) come from
`ThermalCovariance.mean_square_displacement`, Richardson-extrapolated in the mesh (phonopy's thermal displacement
matrices on the same meshes are the independent check, recorded). Their 1σ are propagated two ways: to first order,
σ² = diag(J Σ Jᵀ) with J = ∂property/∂θ by central differences, and, if asked, by an ensemble of θ drawn from
N(θ̂, Σ) (members with imaginary modes dropped and counted). The q meshes are doubled until the values change by
less than MESH_TOLERANCE (1e-3) of their largest magnitude.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .covariance import ThermalCovariance, UnstableError, check_statistics, unstable_modes
from .dynamical import fold_pairs
from .model import ForceConstantModel
from .structure import diagonal_supercell_for, reciprocal_vectors

PROPERTIES_FILE = "properties.json"
PLOT_FILE = "properties.png"
FIT_FILES = ("fit.json", "phonopy_params.yaml")  # what a fit folder must hold for its properties
MESH_TOLERANCE = 1e-3  # largest change on doubling the mesh, relative to a property's largest magnitude
PROPAGATION_TOLERANCE = 1e-2  # ... of the coarser mesh on which the 1σ are propagated
FIRST_MESH = 8  # q points along the longest reciprocal axis of the first mesh tried
LARGEST_MESH = 64  # ... and of the last
DOS_POINTS = 301  # frequency points of the DOS, 0 to DOS_HEADROOM × the highest frequency at θ̂
DOS_HEADROOM = 1.15
STEP = 1e-4  # central-difference step of θ_k: STEP × max(|θ_k|, 0.01 eV/Å²)
UNSTABLE_SHARE = 0.05  # an ensemble with more unstable members than this share is warned about
AGREEMENT_FLOOR = 0.01  # linear and ensemble σ are compared where σ_linear ≥ this share of the property's largest
DEFAULT_TEMPERATURES = np.arange(10.0, 1000.0 + 5.0, 10.0)  # K
THERMAL = ("heat_capacity", "entropy", "free_energy")  # phonopy's thermal properties, in its units
UNITS = {"temperatures": "K", "frequency_points": "THz", "dos": "states/THz per primitive cell",
         "heat_capacity": "J/K/mol", "entropy": "J/K/mol", "free_energy": "kJ/mol", "adp": "Å²", "adp_iso": "Å²"}
GAS_CONSTANT = 8.314462618  # J/K/mol, R = N_A k_B


# ------------------------------------------------------------------ a fit folder read back
@dataclass(frozen=True)
class FitFolder:
    """A fit folder read back (`read_fit_folder`): the model at θ̂ and the fit's record.

    Attributes:
        path: the folder.
        model: ForceConstantModel of phonopy_params.yaml, θ set to fit.json's θ̂ (n_params,) eV/Å².
        result: FitResult of fit.json (θ̂, covariance (n_params, n_params) (eV/Å²)², settings).
    """

    path: Path
    model: ForceConstantModel
    result: object

    @property
    def covariance(self) -> np.ndarray:
        """Σ (n_params, n_params) (eV/Å²)² of θ."""
        return np.asarray(self.result.covariance, dtype=float)

    @property
    def temperature(self) -> float:
        """The fit's temperature, K."""
        return float(self.result.settings["temperature"])

    @property
    def statistics(self) -> str:
        """The fit's phonon statistics, "classical" or "quantum"."""
        return str(self.result.settings["statistics"])


def read_fit_folder(folder) -> FitFolder:
    """The fit folder `folder` (what `ase-tds fit --out` or `ase-tds demo --out` writes) read back.

    Args:
        folder (str | Path): the folder, holding fit.json and phonopy_params.yaml.

    Returns:
        FitFolder: the model at θ̂ and the FitResult of fit.json.

    Raises:
        FileNotFoundError: no such folder, or one without fit.json or phonopy_params.yaml.
        NotADirectoryError: a file, not a folder.
        ValueError: an unreadable fit.json, a fit without a temperature, or fit.json and phonopy_params.yaml of two
            different fits (other parameters or other values).
    """
    from .fitting.result import FitResult

    path = Path(folder)
    what = "give the folder that `ase-tds fit --out` (or `ase-tds demo --out`) wrote"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such fit folder; {what}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a fit folder; {what}")
    missing = [name for name in FIT_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a fit folder: it holds no {' and no '.join(missing)}; {what}")
    record = path / "fit.json"
    try:
        saved = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{record}: not a JSON fit record ({err}); {what}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{record}: not a fit record (a JSON object with parameters, settings, ...); {what}")
    model = ForceConstantModel.from_phonopy(path)
    try:
        result = FitResult.from_dict(saved, symbols=model.primitive.get_chemical_symbols())
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{record}: {err}") from None
    if model.labels != list(result.labels):
        raise ValueError(f"{record} holds the parameters {', '.join(result.labels)}, but {path / 'phonopy_params.yaml'}"
                         f" gives {', '.join(model.labels)}: the two files are not of one fit (or the fit's Born "
                         "charges were fitted, which the properties do not propagate); fit again into a new folder")
    projected = model.theta.detach().cpu().numpy()
    if np.abs(projected - result.theta).max() > 1e-6 * max(np.abs(result.theta).max(), 1e-12):
        raise ValueError(f"{record} and {path / 'phonopy_params.yaml'} hold different force constants: the two files "
                         "are not of one fit; fit again into a new folder")
    temperature = result.settings.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{record}: settings.temperature is {temperature!r}, not a temperature in K; the ADPs are "
                         "computed at the fit's temperature")
    return FitFolder(path, model.set_parameters(result.theta), result)


# ------------------------------------------------------------------ the properties of one θ
def mesh_along_axes(cell, points: int) -> tuple[int, int, int]:
    """A q mesh with `points` along the longest reciprocal axis of `cell` (3, 3) Å and the others in proportion.

    Args:
        cell (array_like): the primitive cell's lattice vectors (3, 3) Å as rows.
        points: points along the longest reciprocal axis.

    Returns:
        (n1, n2, n3), each ≥ 1.
    """
    lengths = np.linalg.norm(reciprocal_vectors(cell), axis=1)
    return tuple(int(max(1, round(points * length / lengths.max()))) for length in lengths)


class PhonopyOfTheta:
    """One phonopy.Phonopy of a model whose force constants are reset for each θ (the supercell's pair map is
    computed once). The supercell is the smallest diagonal one holding the model's cutoff.

    Args:
        model: ForceConstantModel; `at(theta)` sets its θ.
    """

    def __init__(self, model: ForceConstantModel):
        self.model = model
        self.ph = model.to_phonopy(diagonal_supercell_for(np.array(model.unitcell.cell[:]), model.cutoff))
        sc = self.ph.supercell
        self.rows = self.ph.primitive.p2s_map
        self.entries = model.supercell_columns(sc.positions, sc.cell, self.rows)

    def at(self, theta):
        """The phonopy.Phonopy with the compact force constants (n_p, N, 3, 3) eV/Å² of θ (n_params,) eV/Å²."""
        self.model.set_parameters(theta)
        with torch.no_grad():
            if self.model.born is None:
                fc = fold_pairs(self.model.pair_force_constants(), self.entries, len(self.rows),
                                len(self.ph.supercell))
            else:  # the dipole–dipole part too
                fc = self.model.force_constants(self.ph, "compact")
        self.ph.force_constants = fc.cpu().numpy()
        return self.ph


class PropertyCalculator:
    """The properties of one θ (n_params,) eV/Å² on fixed meshes: `calculator(theta)` → {name: array}.

    - "dos" (F,) states/THz per primitive cell at `frequency_points`: phonopy's total DOS (tetrahedron method) on the
      Γ-centred `mesh`;
    - "heat_capacity", "entropy" (T,) J/K/mol and "free_energy" (T,) kJ/mol per mole of primitive cells at
      `temperatures`: phonopy's thermal properties on that mesh (the acoustic modes at Γ left out);
    - "adp" (n, 3, 3) Å², Cartesian, and "adp_iso" (n,) Å² (trace/3) per atom of the primitive cell at
      `adp_temperature`: `ThermalCovariance.mean_square_displacement` on meshes `adp_points` and 2·`adp_points` along the
      longest reciprocal axis, Richardson-extrapolated (its error falls as 1/mesh).

    Args:
        phonopy: the PhonopyOfTheta of the model (its θ is set per call).
        temperatures (array_like): (T,) K, ≥ 0.
        adp_temperature: K of the ADPs (> 0; the fit's).
        statistics: "classical" | "quantum", of the ADPs (phonopy's thermal properties are quantum).
        mesh (tuple[int, int, int]): phonopy's Γ-centred mesh of the DOS and thermal properties.
        adp_points: points along the longest reciprocal axis of the coarser ADP mesh.
        frequency_points (array_like): (F,) THz, evenly spaced, of the DOS.

    Raises:
        UnstableError (on a call): θ with imaginary modes on the meshes.
    """

    def __init__(self, phonopy: PhonopyOfTheta, temperatures, adp_temperature: float, statistics: str, mesh,
                 adp_points: int, frequency_points):
        check_statistics(statistics)
        self.phonopy = phonopy
        self.model = phonopy.model
        self.temperatures = np.asarray(temperatures, dtype=float)
        self.adp_temperature = float(adp_temperature)
        self.statistics = statistics
        self.mesh = tuple(int(m) for m in mesh)
        self.adp_points = int(adp_points)
        self.frequency_points = np.asarray(frequency_points, dtype=float)

    def __call__(self, theta) -> dict[str, np.ndarray]:
        """{"dos", "heat_capacity", "entropy", "free_energy", "adp", "adp_iso"} of θ (n_params,) eV/Å²."""
        return properties_of(self.phonopy.at(theta), self.model, self.mesh, self.temperatures, self.frequency_points,
                             self.adp_temperature, self.statistics, self.adp_points)


def properties_of(ph, model, mesh, temperatures, frequency_points, adp_temperature: float, statistics: str,
                  adp_points: int, averages: dict | None = None) -> dict[str, np.ndarray]:
    """The properties of `PropertyCalculator` of one set of force constants, given to phonopy (`ph`) and in `model`.

    Args:
        ph (phonopy.Phonopy): with the force constants of `model`.
        model (ForceConstantSource): the same force constants.
        mesh (tuple[int, int, int]): phonopy's Γ-centred mesh.
        temperatures (array_like): (T,) K.
        frequency_points (array_like): (F,) THz, evenly spaced.
        adp_temperature: K.
        statistics: of the ADPs.
        adp_points: the coarser ADP mesh's points (`displacement_parameters`).
        averages: U(m) already computed for these force constants (`displacement_parameters`), or None.

    Returns:
        {"dos", "heat_capacity", "entropy", "free_energy", "adp", "adp_iso"}.

    Raises:
        UnstableError: imaginary modes on the meshes.
    """
    values = thermal_properties(ph, mesh, temperatures)
    pitch = frequency_points[1] - frequency_points[0]
    ph.run_total_dos(freq_min=frequency_points[0], freq_max=frequency_points[-1], freq_pitch=pitch)
    values["dos"] = _on_points(ph.total_dos, frequency_points)
    values["adp"] = displacement_parameters(model, adp_temperature, statistics, adp_points, averages)
    values["adp_iso"] = np.trace(values["adp"], axis1=1, axis2=2) / 3
    return values


def thermal_properties(ph, mesh, temperatures) -> dict[str, np.ndarray]:
    """phonopy's C_v, S (T,) J/K/mol and F (T,) kJ/mol per mole of primitive cells on a Γ-centred `mesh` (3,),
    the acoustic modes at Γ left out.

    Args:
        ph (phonopy.Phonopy): with force constants.
        mesh (tuple[int, int, int]): (n1, n2, n3).
        temperatures (array_like): (T,) K.

    Returns:
        {"heat_capacity", "entropy", "free_energy"}: (T,) each.

    Raises:
        UnstableError: a mode below −UNSTABLE_THZ on the mesh.
    """
    ph.run_mesh(mesh, is_gamma_center=True)
    lowest = float(ph.mesh.frequencies.min())
    if unstable_modes(lowest):
        raise UnstableError(f"the force constants have imaginary modes (down to {lowest:.3f} THz on the "
                            f"{'×'.join(map(str, mesh))} q mesh): a dynamically unstable crystal has no harmonic "
                            "thermal properties")
    ph.run_thermal_properties(temperatures=temperatures, exclude_gamma_acoustic=True)
    found = ph.thermal_properties
    return {name: np.array(getattr(found, name), dtype=float) for name in THERMAL}


def _on_points(dos, points: np.ndarray) -> np.ndarray:
    """phonopy's total DOS (F,) at `points` (F,) THz (of its TotalDos), checked to be on them."""
    values = np.asarray(dos.dos, dtype=float)[:len(points)]
    if not np.allclose(np.asarray(dos.frequency_points)[:len(points)], points, rtol=0, atol=1e-9):
        raise RuntimeError("phonopy's DOS is not on the requested frequency points")
    return values


def displacement_parameters(model, temperature: float, statistics: str, points: int,
                            averages: dict | None = None) -> np.ndarray:
    """U = ⟨u uᵀ⟩ (n, 3, 3) Å² per atom of the primitive cell: 2·U(2m) − U(m), U(m) the Brillouin-zone average of
    `ThermalCovariance` on the Γ-centred mesh with m = `points` along the longest reciprocal axis.

    Args:
        model (ForceConstantSource): the force constants.
        temperature: K.
        statistics: "classical" | "quantum".
        points: m.
        averages: {m: U(m)} of this model, temperature and statistics, reused and filled in (None: none kept).

    Returns:
        U (n, 3, 3) Å², Cartesian.

    Raises:
        UnstableError: D(q) not positive definite on the meshes.
    """
    covariance = ThermalCovariance(model, temperature, statistics)
    averages = {} if averages is None else averages
    for m in (points, 2 * points):
        if m not in averages:
            with torch.no_grad():
                mesh = mesh_along_axes(model.primitive.cell[:], m)
                averages[m] = covariance.mean_square_displacement(mesh).cpu().numpy()
    return 2 * averages[2 * points] - averages[points]


def phonopy_displacement_parameters(ph, temperature: float, points: int) -> np.ndarray:
    """phonopy's thermal displacement matrices (quantum) (n, 3, 3) Å², Richardson-extrapolated as
    `displacement_parameters` is: the independent route to the ADPs.

    Args:
        ph (phonopy.Phonopy): with force constants.
        temperature: K.
        points: m, points along the longest reciprocal axis of the coarser mesh.

    Returns:
        U (n, 3, 3) Å², Cartesian.
    """
    found = []
    for m in (points, 2 * points):
        ph.run_mesh(mesh_along_axes(ph.primitive.cell, m), is_gamma_center=True, is_mesh_symmetry=False,
                    with_eigenvectors=True)
        ph.run_thermal_displacement_matrices(temperatures=[temperature], exclude_gamma_acoustic=True)
        found.append(np.array(ph.thermal_displacement_matrices.thermal_displacement_matrices[0]))
    return 2 * found[1] - found[0]


def adp_check(ph, model, temperature: float, points: int) -> dict:
    """The ADPs (quantum) of phonopy's thermal displacement matrices against `displacement_parameters`, on the same
    meshes (`points`, 2·`points`): two routes that must agree to round-off.

    Args:
        ph (phonopy.Phonopy): with the force constants of `model`.
        model (ForceConstantSource): the same force constants.
        temperature: K.
        points: the coarser mesh's points.

    Returns:
        {"mesh_points", "phonopy" (n, 3, 3) Å², "ase_tds" (n, 3, 3) Å², "largest_relative_difference"}.
    """
    ours = displacement_parameters(model, temperature, "quantum", points)
    theirs = phonopy_displacement_parameters(ph, temperature, points)
    return {"mesh_points": [points, 2 * points], "phonopy": theirs.tolist(), "ase_tds": ours.tolist(),
            "largest_relative_difference": float(np.abs(theirs - ours).max() / np.abs(ours).max())}


# ------------------------------------------------------------------ meshes converged
def largest_change(before: dict, after: dict) -> float:
    """max over the properties of max|after − before| / max|after|: the change of every value relative to its
    property's largest magnitude."""
    return max(float(np.abs(after[k] - before[k]).max() / max(np.abs(after[k]).max(), 1e-300)) for k in after)


def converge_mesh(evaluate, what: str, tolerance: float = MESH_TOLERANCE, first: int = FIRST_MESH,
                  largest: int = LARGEST_MESH) -> dict:
    """Double the mesh from `first` points until `evaluate(points)` changes by less than `tolerance` (`largest_change`).

    The values are taken on the finer mesh of the last pair (their error is below that last change); the 1σ are
    propagated on the coarsest mesh within PROPAGATION_TOLERANCE (1e-2) of the next one: a 1σ is quoted to a few
    per cent, and each member of an ensemble costs as much as the mesh.

    Args:
        evaluate (Callable[[int], dict]): points → {name: array}.
        what: the properties' name in a warning.
        tolerance: the largest relative change accepted.
        first: the first mesh's points.
        largest: the last mesh tried.

    Returns:
        {"points": of the values, "propagation_points": of the 1σ, "tolerance", "converged",
        "changes": [[points, change from points/2], ...]}.
    """
    points, before = first, evaluate(first)
    changes = []
    while 2 * points <= largest:
        points *= 2
        after = evaluate(points)
        changes.append([points, largest_change(before, after)])
        if changes[-1][1] < tolerance:
            break
        before = after
    else:
        warnings.warn(f"the {what} changed by {changes[-1][1]:.2g} (relative) from {points // 2} to {points} q points "
                      f"per axis, above the tolerance {tolerance:g}; the values on {points} are used", UserWarning,
                      stacklevel=3)
    coarse = [m // 2 for m, change in changes if change < PROPAGATION_TOLERANCE]
    return {"points": points, "propagation_points": coarse[0] if coarse else points, "tolerance": tolerance,
            "propagation_tolerance": PROPAGATION_TOLERANCE, "converged": changes[-1][1] < tolerance,
            "changes": changes}


# ------------------------------------------------------------------ propagation of Σ
def covariance_factor(covariance, labels=None) -> np.ndarray:
    """L (n, n) with L Lᵀ = Σ (from the eigen-decomposition; rounding below zero clipped), to draw θ̂ + L z.

    Args:
        covariance (array_like): Σ (n, n) (eV/Å²)², symmetric positive semi-definite.
        labels (Sequence[str] | None): the parameters' labels, for the error message.

    Returns:
        L (n, n) eV/Å².

    Raises:
        ValueError: a Σ that is not square, not finite, or not positive semi-definite.
    """
    cov = np.asarray(covariance, dtype=float)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"the covariance of θ must be a square (n, n) matrix, got shape {cov.shape}")
    if not np.isfinite(cov).all():
        bad = np.flatnonzero(~np.isfinite(np.diag(cov)) | ~np.isfinite(cov).all(axis=1))
        names = ", ".join(labels[i] if labels is not None else str(i) for i in bad)
        raise ValueError(f"the covariance of θ is not finite (parameters {names}): the data do not determine them, so "
                         "no error bars follow; fit again with --prior-sigma (a ridge towards the start)")
    cov = (cov + cov.T) / 2
    eigenvalues, vectors = np.linalg.eigh(cov)
    if eigenvalues.min() < -1e-8 * max(eigenvalues.max(), 0.0):
        raise ValueError(f"the covariance of θ is not positive semi-definite (eigenvalue {eigenvalues.min():.3g}); "
                         "give a covariance matrix")
    return vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))


def linear_sigma(func, theta, covariance, step: float = STEP) -> dict[str, np.ndarray]:
    """1σ of each property to first order: σ² = diag(J Σ Jᵀ), J = ∂property/∂θ by central differences (steps
    `step`·max(|θ_k|, 0.01 eV/Å²)).

    Args:
        func (Callable[[np.ndarray], dict]): θ (n,) eV/Å² → {name: array}.
        theta (array_like): θ̂ (n,) eV/Å².
        covariance (array_like): Σ (n, n) (eV/Å²)².
        step: relative step.

    Returns:
        {name: 1σ} in the properties' shapes and units.
    """
    theta = np.asarray(theta, dtype=float)
    covariance_factor(covariance)  # refuses a Σ without error bars before any work
    shapes = None
    columns = []
    for k in range(len(theta)):
        h = step * max(abs(theta[k]), 1e-2)
        shifted = theta.copy()
        shifted[k] += h
        plus = func(shifted)
        shifted[k] -= 2 * h
        minus = func(shifted)
        shapes = shapes or {name: np.shape(value) for name, value in plus.items()}
        columns.append((_flat(plus) - _flat(minus)) / (2 * h))
    jac = np.stack(columns, axis=1)
    variance = np.einsum("ik,kl,il->i", jac, np.asarray(covariance, dtype=float), jac)
    return _unflat(np.sqrt(np.clip(variance, 0.0, None)), shapes)


def ensemble_sigma(func, theta, covariance, members: int, seed: int | None = 0, labels=None,
                   progress: bool = True) -> tuple[dict, dict, dict]:
    """1σ and mean of each property over an ensemble of θ drawn from N(θ̂, Σ); members with imaginary modes
    (`func` raises UnstableError) are dropped and counted.

    Args:
        func (Callable[[np.ndarray], dict]): θ (n,) eV/Å² → {name: array}.
        theta (array_like): θ̂ (n,) eV/Å².
        covariance (array_like): Σ (n, n) (eV/Å²)².
        members: the number of θ drawn (≥ 2).
        seed: numpy seed of the draws; None = fresh entropy.
        labels (Sequence[str] | None): the parameters' labels, for error messages.
        progress: show a tqdm progress bar.

    Returns:
        ({name: 1σ (sample standard deviation)}, {name: mean}, {"members", "stable", "unstable", "seed"}).

    Raises:
        ValueError: fewer than 2 members, or fewer than 2 stable ones.
    """
    if isinstance(members, bool) or not isinstance(members, (int, np.integer)) or members < 2:
        raise ValueError(f"the ensemble needs at least 2 members (e.g. 1000), got {members!r}")
    factor = covariance_factor(covariance, labels)
    rng = np.random.default_rng(seed)
    draws = np.asarray(theta, dtype=float) + rng.standard_normal((members, len(factor))) @ factor.T
    values, shapes, unstable = [], None, 0
    for member in tqdm(draws, desc="ensemble", disable=not progress):
        try:
            found = func(member)
        except UnstableError:
            unstable += 1
            continue
        shapes = shapes or {name: np.shape(value) for name, value in found.items()}
        values.append(_flat(found))
    if len(values) < 2:
        raise ValueError(f"{unstable} of {members} members of the ensemble have imaginary modes: Σ reaches far into "
                         "unstable force constants, so no ensemble error bars follow; use the linear ones")
    if unstable > UNSTABLE_SHARE * members:
        warnings.warn(f"{unstable} of {members} ensemble members have imaginary modes and were dropped: the ensemble "
                      "describes the stable part of N(θ̂, Σ) only", UserWarning, stacklevel=2)
    values = np.array(values)
    record = {"members": int(members), "stable": len(values), "unstable": unstable, "seed": seed}
    return _unflat(values.std(axis=0, ddof=1), shapes), _unflat(values.mean(axis=0), shapes), record


def _flat(values: dict) -> np.ndarray:
    return np.concatenate([np.ravel(values[name]) for name in sorted(values)])


def _unflat(flat: np.ndarray, shapes: dict) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name in sorted(shapes):
        size = int(np.prod(shapes[name]))
        out[name] = flat[start:start + size].reshape(shapes[name])
        start += size
    return out


def agreement(linear: dict, ensemble: dict, floor: float = AGREEMENT_FLOOR) -> dict[str, float]:
    """Per property, the largest |σ_ensemble/σ_linear − 1| where σ_linear ≥ `floor` × its largest (where the 1σ
    itself is negligible, e.g. C_v at high T, its ratio is noise).

    Args:
        linear: {name: 1σ} of `linear_sigma`.
        ensemble: {name: 1σ} of `ensemble_sigma`.
        floor: the share of a property's largest σ_linear below which its entries are not compared.

    Returns:
        {name: largest relative difference} (NaN where every σ_linear is zero).
    """
    out = {}
    for name, lin in linear.items():
        lin, ens = np.ravel(lin), np.ravel(ensemble[name])
        kept = lin >= floor * lin.max() if lin.max() > 0 else np.zeros(len(lin), dtype=bool)
        out[name] = float(np.abs(ens[kept] / lin[kept] - 1).max()) if kept.any() else float("nan")
    return out


# ------------------------------------------------------------------ the result
@dataclass
class PhononProperties:
    """Phonon properties at θ̂ with their 1σ (`phonon_properties`); `to_dict` is what properties.json holds.

    Attributes:
        temperatures: (T,) K of the thermal properties.
        frequency_points: (F,) THz of the DOS.
        values: at θ̂: "dos" (F,) states/THz per primitive cell; "heat_capacity", "entropy" (T,) J/K/mol and
            "free_energy" (T,) kJ/mol per mole of primitive cells; "adp" (n, 3, 3) Å² and "adp_iso" (n,) Å².
        sigma_linear: 1σ of each, to first order (J Σ Jᵀ).
        sigma_ensemble: 1σ of each over the ensemble (None without one).
        ensemble_mean: the ensemble's mean of each (None without one).
        adp_temperature: K of the ADPs.
        statistics: of the ADPs, "classical" | "quantum".
        symbols: (n,) chemical symbols of the primitive cell's atoms.
        n_atoms: n, atoms in the primitive cell (the classical limit of C_v is 3nR).
        mesh: how the DOS and thermal-property mesh was chosen: {"mesh" (3,), "points", "tolerance", "converged",
            "changes"}.
        adp_mesh: the same for the ADPs' meshes {"meshes" [(3,), (3,)], ...}.
        ensemble: {"members", "stable", "unstable", "seed"} (None without one).
        agreement: per property, the largest |σ_ensemble/σ_linear − 1| (`agreement`; None without an ensemble).
        adp_check: the ADPs (quantum) by phonopy's thermal displacement matrices on the same meshes against
            ThermalCovariance's: {"phonopy", "ase_tds", "largest_relative_difference"}.
    """

    temperatures: np.ndarray
    frequency_points: np.ndarray
    values: dict
    sigma_linear: dict
    adp_temperature: float
    statistics: str
    symbols: list
    n_atoms: int
    mesh: dict
    adp_mesh: dict
    adp_check: dict
    sigma_ensemble: dict | None = None
    ensemble_mean: dict | None = None
    ensemble: dict | None = None
    agreement: dict | None = field(default=None)

    @property
    def sigma(self) -> dict:
        """The 1σ to quote: the ensemble's where there is one, else the linear ones."""
        return self.sigma_ensemble if self.sigma_ensemble is not None else self.sigma_linear

    def to_dict(self) -> dict:
        """What properties.json holds: every array as nested lists, with `units`."""
        def lists(values):
            return None if values is None else {k: np.asarray(v).tolist() for k, v in values.items()}

        return {"units": dict(UNITS, per="mole of primitive cells (thermal properties), primitive cell (DOS)"),
                "temperatures": self.temperatures.tolist(), "frequency_points": self.frequency_points.tolist(),
                "values": lists(self.values), "sigma_linear": lists(self.sigma_linear),
                "sigma_ensemble": lists(self.sigma_ensemble), "ensemble_mean": lists(self.ensemble_mean),
                "adp_temperature": self.adp_temperature, "statistics": self.statistics, "symbols": list(self.symbols),
                "n_atoms": self.n_atoms, "classical_heat_capacity": 3 * self.n_atoms * GAS_CONSTANT,
                "mesh": self.mesh, "adp_mesh": self.adp_mesh, "ensemble": self.ensemble, "agreement": self.agreement,
                "adp_check": self.adp_check}


def check_temperatures(temperatures) -> np.ndarray:
    """The temperatures (T,) K as floats, refused unless a non-empty list of finite numbers ≥ 0."""
    try:
        values = np.atleast_1d(np.asarray(temperatures, dtype=float))
    except (TypeError, ValueError):
        raise ValueError(f"temperatures must be numbers in K, got {temperatures!r}") from None
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"temperatures must be one or more finite numbers ≥ 0 K (e.g. 10:1000:10), got "
                         f"{np.array2string(values, threshold=6)}")
    return values


def phonon_properties(model: ForceConstantModel, covariance, temperature: float, statistics: str = "quantum",
                      temperatures=DEFAULT_TEMPERATURES, mesh: int | str = "auto", ensemble: int = 0,
                      seed: int | None = 0, progress: bool = True) -> PhononProperties:
    """The DOS, C_v(T), S(T), F(T) (phonopy's) and the ADPs (at `temperature`) of `model` at its θ̂, with 1σ from
    θ ~ N(θ̂, Σ): linear propagation always, an ensemble of `ensemble` members if asked.

    Args:
        model: ForceConstantModel at θ̂ (not changed).
        covariance (array_like): Σ (n_params, n_params) (eV/Å²)² of θ.
        temperature: K (> 0) of the ADPs, the fit's.
        statistics: "classical" | "quantum", of the ADPs (the fit's).
        temperatures (array_like): (T,) K ≥ 0 of the thermal properties.
        mesh: "auto" (doubled from FIRST_MESH until the thermal properties and the ADPs change by less than
            MESH_TOLERANCE) or the points along the longest reciprocal axis (the ADPs then use it and twice it).
        ensemble: members drawn from N(θ̂, Σ) (0: linear propagation only; otherwise ≥ 2, e.g. 1000).
        seed: numpy seed of the ensemble; None = fresh entropy.
        progress: show tqdm progress bars.

    Returns:
        PhononProperties.

    Raises:
        ValueError: bad temperatures, mesh, ensemble or covariance (not finite: no error bars follow).
        UnstableError: θ̂ with imaginary modes.
    """
    temperatures = check_temperatures(temperatures)
    check_statistics(statistics)
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
        raise ValueError(f"temperature must be a positive temperature in K (the fit's), got {temperature!r}")
    if isinstance(ensemble, bool) or not isinstance(ensemble, (int, np.integer)) or ensemble < 0 or ensemble == 1:
        raise ValueError(f"ensemble must be 0 (linear propagation only) or a number of members ≥ 2, got {ensemble!r}")
    if mesh != "auto" and (isinstance(mesh, bool) or not isinstance(mesh, (int, np.integer)) or mesh < 1):
        raise ValueError(f"mesh must be 'auto' or a positive number of q points along the longest reciprocal axis, "
                         f"got {mesh!r}")
    theta = model.theta.detach().cpu().numpy().copy()
    covariance = np.asarray(covariance, dtype=float)
    if covariance.shape != (len(theta), len(theta)):
        raise ValueError(f"the covariance must be ({len(theta)}, {len(theta)}) for the model's {len(theta)} "
                         f"parameters, got shape {covariance.shape}")
    covariance_factor(covariance, model.labels)
    cell = model.primitive.cell[:]
    phonopy = PhonopyOfTheta(copy.deepcopy(model))
    ph, member, averages = phonopy.at(theta), phonopy.model, {}
    if mesh == "auto":
        mesh_record = converge_mesh(lambda m: thermal_properties(ph, mesh_along_axes(cell, m), temperatures),
                                    "thermal properties")
        adp_record = converge_mesh(lambda m: {"adp": displacement_parameters(member, temperature, statistics, m,
                                                                             averages)}, "ADPs",
                                   largest=LARGEST_MESH // 2)
    else:
        mesh_record = {"points": int(mesh), "propagation_points": int(mesh), "converged": None}
        adp_record = dict(mesh_record)
    mesh_record["mesh"] = list(mesh_along_axes(cell, mesh_record["points"]))
    adp_record["meshes"] = [list(mesh_along_axes(cell, m)) for m in (adp_record["points"], 2 * adp_record["points"])]
    ph.run_mesh(mesh_record["mesh"], is_gamma_center=True)
    frequency_points = np.linspace(0.0, DOS_HEADROOM * float(ph.mesh.frequencies.max()), DOS_POINTS)
    values = properties_of(phonopy.at(theta), member, mesh_record["mesh"], temperatures, frequency_points, temperature,
                           statistics, adp_record["points"], averages)
    propagated = PropertyCalculator(phonopy, temperatures, temperature, statistics,
                                    mesh_along_axes(cell, mesh_record["propagation_points"]),
                                    adp_record["propagation_points"], frequency_points)
    check = adp_check(phonopy.at(theta), member, temperature, adp_record["propagation_points"])
    result = PhononProperties(temperatures, frequency_points, values, linear_sigma(propagated, theta, covariance),
                              float(temperature), statistics, model.primitive.get_chemical_symbols(), model.n_atoms,
                              mesh_record, adp_record, check)
    if ensemble:
        result.sigma_ensemble, result.ensemble_mean, result.ensemble = ensemble_sigma(
            propagated, theta, covariance, int(ensemble), seed, model.labels, progress)
        result.agreement = agreement(result.sigma_linear, result.sigma_ensemble)
    return result


def write_properties(folder, temperatures=DEFAULT_TEMPERATURES, mesh: int | str = "auto", ensemble: int = 0,
                     seed: int | None = 0, device=None, progress: bool = True) -> PhononProperties:
    """The properties of a fit folder with their 1σ (`phonon_properties` at the fit's θ̂, Σ, temperature and
    statistics), written into it as properties.json and properties.png, both or neither.

    Args:
        folder (str | Path): a fit folder (`read_fit_folder`).
        temperatures (array_like): (T,) K ≥ 0 of the thermal properties.
        mesh: "auto" or points along the longest reciprocal axis, as in `phonon_properties`.
        ensemble: members drawn from N(θ̂, Σ) (0: linear propagation only).
        seed: numpy seed of the ensemble.
        device (str | torch.device | None): torch device of the ADPs; None = CPU.
        progress: show tqdm progress bars.

    Returns:
        PhononProperties.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: not a fit folder, or bad arguments (see
            `read_fit_folder`, `phonon_properties`).
        PermissionError: the folder is not writable.
    """
    import os

    from .atomic import write_files
    from .plot import plot_properties

    fit = read_fit_folder(folder)
    if not os.access(fit.path, os.W_OK | os.X_OK):
        raise PermissionError(f"{fit.path}: the fit folder is not writable, so properties.json cannot go into it")
    model = fit.model if device is None else fit.model.to(device)
    props = phonon_properties(model, fit.covariance, fit.temperature, fit.statistics, temperatures, mesh, ensemble,
                              seed, progress)
    record = dict(props.to_dict(), fit_folder=str(fit.path.resolve()))
    write_files(fit.path, {PROPERTIES_FILE: lambda path: path.write_text(json.dumps(record, indent=1,
                                                                                    ensure_ascii=False)),
                           PLOT_FILE: lambda path: plot_properties(props, path, title=f"{fit.path.name}: phonon "
                                                                   "properties ±1σ")})
    return props


def sigma_text(value: float, sigma: float) -> str:
    """'0.00543(12)': a value with its 1σ in the last two digits shown."""
    if not (sigma > 0 and math.isfinite(sigma)):
        return f"{value:.6g}"
    digits = max(0, 1 - int(math.floor(math.log10(sigma))))
    return f"{value:.{digits}f}({round(sigma * 10 ** digits):d})"
