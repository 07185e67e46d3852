"""MLIP training data: thermal configurations of fitted force constants, with harmonic energies and forces.

    write_training_data("fit_out/", "train.extxyz", supercell=(3, 3, 3), temperature=300, n_samples=200)
    frames = ase.io.read("train.extxyz", ":")    # frames[0].info["REF_energy"], frames[0].arrays["REF_forces"]

Displacements u (Å) are drawn by the Cholesky samplers of `ase_tds.sampling` (the exact harmonic
distribution of the periodic supercell, centre of mass fixed, classical or quantum); energies
E = ½ uᵀΦu (eV, zero at the ideal lattice) and forces F = −Φu (eV/Å) come from TDSFitted. No stress:
the harmonic model has a fixed cell. Given the covariance Σ of a fit's θ, each frame's force constants are drawn
from N(θ̂, Σ) (info["theta"]), so that the training data carry the fit's uncertainty.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.extxyz import write_extxyz
from tqdm.auto import tqdm

from .atomic import atomic_paths
from .calculator import TDSFitted
from .covariance import check_statistics, check_temperature
from .model import ForceConstantModel
from .sampling import DenseSampler, QSpaceSampler

# the dense (real-space) sampler is used up to this many supercell atoms, the q-space one beyond
DENSE_MAX_ATOMS = 500
METADATA_KEYS = ("temperature", "statistics", "supercell", "source", "ase_tds_version")
# names extxyz uses itself, and the metadata: not available as energy or forces keys
ENSEMBLE_KEY = "theta"  # info key of each frame's θ (n_params,) eV/Å² when drawn from N(θ̂, Σ)
MAX_REDRAWS = 100  # draws of θ with imaginary modes in a row before an ensemble export gives up
RESERVED_KEYS = METADATA_KEYS + (ENSEMBLE_KEY, "positions", "numbers", "species", "pos", "Z", "Lattice", "Properties",
                                 "pbc", "masses", "momenta")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def thermal_configurations(model: ForceConstantModel, supercell, temperature: float, n_samples: int,
                           statistics: str = "classical", seed: int | None = None, sampler: str = "auto",
                           energy_key: str = "REF_energy", forces_key: str = "REF_forces", also_plain: bool = True,
                           source: str | None = None, progress: bool = True, covariance=None):
    """An iterator over `n_samples` ase.Atoms: the L1×L2×L3 supercell of `model.unitcell` with thermal displacements.

    Any supercell size works: in one shorter than twice the cutoff each pair's images are summed (the Hessian of
    that periodic supercell). Atoms go cell by cell (C order), unit-cell atom fastest, as in `ase_tds.sampling`.
    Each frame holds E (eV) in info[energy_key] and F (N, 3) eV/Å in arrays[forces_key], and info
    METADATA_KEYS (`source` names the force constants).

    Args:
        model: ForceConstantModel; its θ (eV/Å²) at the call is used.
        supercell (tuple[int, int, int]): (L1, L2, L3) positive integers, repetitions of the unit cell.
        temperature: K (> 0; 0 allowed for quantum zero-point motion).
        n_samples: number of configurations (≥ 1).
        statistics: "classical" | "quantum".
        seed: int for reproducible draws; None = fresh entropy.
        sampler: "dense" (classical only), "qspace", or "auto" (dense for classical up to DENSE_MAX_ATOMS = 500
            atoms, q-space beyond).
        energy_key: info key of E (eV); "energy" = only the calculator's.
        forces_key: arrays key of F (N, 3) eV/Å; "forces" = only the calculator's.
        also_plain: also attach E and F as each frame's calculator results (`get_potential_energy`,
            `get_forces`).
        source: the name written to info["source"]; None = repr(model).
        progress: show a tqdm progress bar.
        covariance (array_like | None): Σ (n_params, n_params) (eV/Å²)² of θ: each frame then has its own θ drawn
            from N(θ̂, Σ) (θ̂ = the model's θ; draws with imaginary modes are drawn again), in info["theta"]
            (n_params,) eV/Å²; None = every frame from the model's θ.

    Returns:
        (Iterator[Atoms]): a generator of n_samples ase.Atoms (N = L1·L2·L3 × atoms of the unit cell), drawn lazily.

    Raises:
        ValueError: a bad supercell, temperature, n_samples, statistics, sampler, key name or covariance.
        UnstableError: force constants that are not dynamically stable (or, with a covariance, MAX_REDRAWS draws in a
            row that are not).
    """
    supercell, n_samples = _check_arguments(supercell, temperature, n_samples, statistics, energy_key, forces_key)
    if sampler not in ("auto", "dense", "qspace"):
        raise ValueError(f"sampler must be 'auto', 'dense' or 'qspace', got {sampler!r}")
    n_atoms = int(np.prod(supercell)) * len(model.unitcell)
    dense = sampler == "dense" or (sampler == "auto" and statistics == "classical" and n_atoms <= DENSE_MAX_ATOMS)
    kind = DenseSampler if dense else QSpaceSampler
    factor = None if covariance is None else _covariance_factor(model, covariance)
    draw = kind(model, supercell, temperature, statistics, progress=False)
    ideal = Atoms(draw.symbols, positions=draw.positions, cell=draw.cell, pbc=True)

    from . import __version__

    info = dict(temperature=float(temperature), statistics=statistics, supercell=np.array(supercell),
                source=source or repr(model), ase_tds_version=__version__)
    generator = torch.Generator(device=model.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    keys = (energy_key, forces_key, also_plain)
    if factor is not None:
        members = _members(model, factor, kind, supercell, temperature, statistics, generator)
        return _ensemble_frames(members, ideal, info, generator, n_samples, keys, progress)
    return _frames(draw, TDSFitted(model), ideal, info, generator, n_samples, keys, progress)


def _covariance_factor(model, covariance) -> torch.Tensor:
    """L (n, n) with L Lᵀ = Σ, on the model's device, refused unless Σ is (n_params, n_params), finite and PSD."""
    from .properties import covariance_factor

    covariance = np.asarray(covariance, dtype=float)
    if covariance.shape != (model.n_params, model.n_params):
        raise ValueError(f"covariance must be ({model.n_params}, {model.n_params}) for the model's {model.n_params} "
                         f"parameters ({', '.join(model.labels)}), got shape {covariance.shape}")
    return torch.as_tensor(covariance_factor(covariance, model.labels), dtype=model.dtype, device=model.device)


def _members(model, factor, kind, supercell, temperature, statistics, generator):
    """Endless (θ (n,) numpy, sampler, TDSFitted) of θ = θ̂ + L z, z ~ N(0, I) from `generator`; θ with imaginary
    modes (`covariance.lowest_frequency`, or the supercell's own Hessian) drawn again, MAX_REDRAWS in a row at most."""
    from .covariance import UnstableError, lowest_frequency, unstable_modes

    center = model.theta.detach()
    member = copy.deepcopy(model)
    while True:
        for _ in range(MAX_REDRAWS):
            z = torch.randn(len(center), generator=generator, dtype=center.dtype, device=center.device)
            member.set_parameters((center + factor @ z).cpu().numpy())
            if unstable_modes(lowest_frequency(member)):
                continue
            try:
                draw = kind(member, supercell, temperature, statistics, progress=False)
            except UnstableError:
                continue
            yield member.theta.detach().cpu().numpy().copy(), draw, TDSFitted(member)
            break
        else:
            raise UnstableError(f"{MAX_REDRAWS} force constants in a row drawn from N(θ̂, Σ) have imaginary modes: "
                                "Σ reaches far into unstable force constants; export without the ensemble")


def _ensemble_frames(members, ideal, info, generator, n_samples, keys, progress):
    """The generator behind `thermal_configurations` with a covariance: one θ of `members` and one draw per frame."""
    with tqdm(total=n_samples, desc="thermal configurations (θ ensemble)", disable=not progress) as bar:
        for _, (theta, draw, calc) in zip(range(n_samples), members):
            with torch.no_grad():
                u = draw.sample(1, generator).cpu().numpy()[0]
            atoms = _frame(ideal, u, calc, info, *keys)
            atoms.info[ENSEMBLE_KEY] = theta
            bar.update()
            yield atoms


def _frames(draw, calc, ideal, info, generator, n_samples, keys, progress):
    """The generator behind `thermal_configurations`, drawing u in batches of ≤ 2²² numbers."""
    batch = max(1, 2**22 // (3 * len(ideal)))
    with tqdm(total=n_samples, desc="thermal configurations", disable=not progress) as bar:
        for start in range(0, n_samples, batch):
            with torch.no_grad():
                u = draw.sample(min(batch, n_samples - start), generator).cpu().numpy()
            for one in u:
                bar.update()
                yield _frame(ideal, one, calc, info, *keys)


def _frame(ideal, u, calc, info, energy_key, forces_key, also_plain) -> Atoms:
    """The frame of displacements u (N, 3) Å from `ideal`, with E (eV) and F (N, 3) eV/Å of `calc` and `info`."""
    atoms = ideal.copy()
    atoms.positions += u
    energy, forces = calc.get_potential_energy(atoms), calc.get_forces(atoms)
    atoms.info.update(info)
    if energy_key != "energy":
        atoms.info[energy_key] = energy
    if forces_key != "forces":
        atoms.arrays[forces_key] = forces
    plain = {}
    if also_plain or energy_key == "energy":
        plain["energy"] = energy
    if also_plain or forces_key == "forces":
        plain["forces"] = forces
    if plain:
        atoms.calc = SinglePointCalculator(atoms, **plain)
    return atoms


def write_training_data(source, path, supercell, temperature: float, n_samples: int,
                        statistics: str = "classical", seed: int | None = None,
                        energy_key: str = "REF_energy", forces_key: str = "REF_forces", also_plain: bool = True,
                        sampler: str = "auto", device=None, progress: bool = True, covariance=None) -> Path:
    """Write `n_samples` thermal configurations as extxyz at `path` (what MACE and NequIP read); returns the path.

    The file is written under a temporary name beside `path` and renamed when complete: an error or
    interruption leaves no half-written file.

    Args:
        source (ForceConstantModel | phonopy.Phonopy | str | Path): a ForceConstantModel, an `ase-tds fit`/`demo` output
            folder, a phonopy.load-able file or a phonopy.Phonopy — resolved as TDSFitted resolves it.
        path (str | Path): the extxyz file to write; its folder must exist.
        supercell (tuple[int, int, int]): (L1, L2, L3) positive integers, repetitions of the unit cell.
        temperature: K (> 0; 0 allowed for quantum zero-point motion).
        n_samples: number of configurations (≥ 1).
        statistics: "classical" | "quantum".
        seed: int for reproducible draws; None = fresh entropy.
        energy_key: info key of E (eV), as in `thermal_configurations`.
        forces_key: arrays key of F (N, 3) eV/Å, as in `thermal_configurations`.
        also_plain: also write E and F as the frames' plain energy/forces.
        sampler: "auto", "dense" or "qspace", as in `thermal_configurations`.
        device (str | torch.device | None): torch device to draw on; None = the model's (a given model is copied there,
            not moved).
        progress: show a tqdm progress bar.
        covariance (array_like | None): Σ (n_params, n_params) (eV/Å²)² of θ, e.g. a fit's
            (`ase_tds.properties.read_fit_folder(folder).covariance`): each frame's θ drawn from N(θ̂, Σ), as in
            `thermal_configurations`; None = every frame from θ̂.

    Returns:
        `path`, as a Path.

    Raises:
        IsADirectoryError: `path` is a folder.
        FileNotFoundError: the folder of `path` does not exist.
        PermissionError: the folder is not writable.
        ValueError: a bad supercell, temperature, n_samples, statistics, sampler, key name or covariance.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name, e.g. {path / 'train.extxyz'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder for the output file; create it first")
    _check_arguments(supercell, temperature, n_samples, statistics, energy_key, forces_key)
    if isinstance(source, ForceConstantModel):
        model, name = source, repr(source)
    else:
        model = ForceConstantModel.from_phonopy(source)
        name = str(Path(source).resolve()) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if device is not None and torch.device(device) != model.device:
        model = copy.deepcopy(model).to(device)
    with atomic_paths(path) as (partial,):
        try:
            out = open(partial, "w")
        except PermissionError as err:
            raise PermissionError(f"cannot write in {path.parent} ({err.strerror}); choose a writable location") from None
        with out:
            frames = thermal_configurations(model, supercell, temperature, n_samples, statistics, seed, sampler,
                                            energy_key, forces_key, also_plain, name, progress, covariance)
            write_extxyz(out, frames)
    return path


def _check_arguments(supercell, temperature, n_samples, statistics, energy_key, forces_key):
    """Refuse bad arguments with the reason and the fix; returns (supercell (3,) ints, n_samples int)."""
    check_statistics(statistics)
    check_temperature(temperature, statistics)
    for name, key, other in (("energy_key", energy_key, "forces"), ("forces_key", forces_key, "energy")):
        if not isinstance(key, str) or not _KEY.match(key) or key in RESERVED_KEYS + (other,):
            raise ValueError(f"{name} must be a name of letters, digits and '_' (e.g. 'REF_{name[:-4]}'), not "
                             f"one of {RESERVED_KEYS + (other,)}; got {key!r}")
    if energy_key == forces_key:
        raise ValueError(f"energy_key and forces_key must differ, both are {energy_key!r}")
    values = np.ravel(np.asarray(supercell, dtype=object))
    try:
        reps = tuple(int(x) for x in values)
        whole = all(float(x) == r for x, r in zip(values, reps))
    except (TypeError, ValueError):
        whole = False
    if len(values) != 3 or not whole or min(reps) < 1:
        raise ValueError(f"supercell must be three positive integers (L1, L2, L3 repetitions of the unit cell), "
                         f"got {supercell!r}")
    try:
        count_ok = not isinstance(n_samples, bool) and float(n_samples).is_integer() and n_samples >= 1
    except (TypeError, ValueError):
        count_ok = False
    if not count_ok:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    return reps, int(n_samples)
