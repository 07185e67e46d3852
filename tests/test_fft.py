"""The fft model (issue 22): points on a regular hkl grid, all orders by FFTs over one periodic crystal — against the
per-point gaussian model on the same crystal, an independent numpy/phonopy reference with Born charges, gradients,
grid detection, the converged limit, and the route `simulate` and `fit` choose by themselves."""

from __future__ import annotations

import copy
from math import factorial

import numpy as np
import pytest
import torch
from ase.build import bulk

from ase_tds import ForceConstantModel, fit, simulate, tds_model
from ase_tds.forward import FFTModel, GaussianModel
from ase_tds.forward.fft import Monomials, orders_for
from ase_tds.forward.voxels import commensurate_grid, mesh_index
from ase_tds.structure import reciprocal_q

import reference_tds as ref
from conftest import DATA, cached_model

T = 300.0


def springs(name: str) -> ForceConstantModel:
    return cached_model(name).set_from_springs(T)


def on_mesh(model, grid, count, q_max, seed=0) -> np.ndarray:
    """Cartesian Q (count, 3) on the reciprocal lattice of the crystal `grid`, near Bragg peaks too."""
    return ref.commensurate_points(model.primitive.cell[:], grid, count, q_max, np.random.default_rng(seed),
                                   bragg_radius=0.0)


def hkl_grid(origin, steps, counts) -> np.ndarray:
    """hkl (N, 3) = origin + (i, j, k) · steps, i < counts[0], …: a volume's voxels."""
    axes = [o + s * np.arange(c) for o, s, c in zip(origin, steps, counts)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


@pytest.mark.parametrize("name, grid, q_max", [("Ni", (6, 6, 6), 7.0), ("NaCl", (5, 5, 5), 5.0),
                                               ("MgB2", (4, 4, 5), 4.0)])
def test_equals_the_per_point_model_on_the_same_crystal(name, grid, q_max):
    """Ni (1 atom), NaCl (2) and MgB₂ (3, hexagonal: phases e^{iG·(r_κ' − r_κ)} not ±1): the fft model equals the
    per-point gaussian model with refine=False on the same crystal, which sums over l directly."""
    model = springs(name)
    q = on_mesh(model, grid, 30, q_max)
    fft = FFTModel(model, T, grid=grid, voxels=q, tail=1e-10)
    with torch.no_grad():
        ours = fft(q).numpy()
        theirs = GaussianModel(model, T, grid=grid, refine=False)(q).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


@pytest.mark.parametrize("statistics", ["classical", "quantum"])
def test_equals_the_independent_reference_with_born_charges(statistics):
    """phonopy's NaCl with its BORN: the fft model equals `reference_tds` (numpy sums over l of phonopy's eigenvectors,
    with its dipole correction) on a 6³ crystal."""
    import phonopy

    from ase_tds import PhonopyForceConstants

    path = DATA / "dft" / "NaCl"
    ph = phonopy.load(path / "phonopy_params.yaml", produce_fc=False, born_filename=path / "BORN", is_nac=True,
                      log_level=0)
    source = PhonopyForceConstants(ph)
    mesh = (6, 6, 6)
    q = ref.commensurate_points(ph.primitive.cell, mesh, 20, 6.0, np.random.default_rng(1))
    expected = ref.periodic_crystal_intensity(ph, q, mesh, T, statistics)
    with torch.no_grad():
        ours = FFTModel(source, T, statistics=statistics, grid=mesh, voxels=q, tail=1e-10)(q).numpy()
    np.testing.assert_allclose(ours, expected, rtol=2e-6)


def test_a_displaced_origin_changes_nothing():
    """NaCl with every atom moved by one vector: the same crystal, the same intensities (the phases carry only
    r_κ' − r_κ, whatever the origin)."""
    model = ForceConstantModel(bulk("NaCl", "rocksalt", a=5.64), shells=2).set_from_springs(T)
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.positions += [0.37, -0.91, 1.23]
    moved = ForceConstantModel(atoms, shells=2).set_from_springs(T)
    grid = (5, 5, 5)
    q = on_mesh(model, grid, 20, 5.0)
    with torch.no_grad():
        a = FFTModel(model, T, grid=grid, voxels=q)(q).numpy()
        b = FFTModel(moved, T, grid=grid, voxels=q)(q).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-10)


def test_monomial_coefficients_are_the_powers_of_the_form(rng):
    """Σ_α c_α Q^α = Σ_n (Q·C·Q)^n/n! for a random C and Q, and the coefficients' own backward passes gradcheck."""
    monomials = Monomials(5)
    c = torch.as_tensor(rng.normal(size=(4, 3, 3)))
    q = torch.as_tensor(rng.normal(size=(4, 3)))
    x = torch.einsum("ba,bac,bc->b", q, c, q)
    expected = sum(x**n / factorial(n) for n in range(1, 6))
    got = (monomials.coefficients(c.permute(1, 2, 0)).T * monomials.values(q)).sum(-1)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-12)
    c.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: Monomials(4).coefficients(x), (c.permute(1, 2, 0),))


def test_the_order_bound_holds():
    """The tail beyond the chosen order is below `tail` of e^X − 1 at the largest |X| (and so at every smaller)."""
    for x_max in (0.05, 0.3, 1.0, 2.0):
        n = orders_for(x_max, 1e-4)
        for x in (x_max, -x_max, 0.3 * x_max):
            tail = np.expm1(x) - sum(x**k / factorial(k) for k in range(1, n + 1))
            assert abs(tail) <= 1e-4 * abs(np.expm1(x))
    with pytest.raises(ValueError, match="per-point"):
        orders_for(20.0, 1e-4)


@pytest.mark.parametrize("grid", [(4, 4, 5), (4, 4, 4)])  # odd and even L3 (the adjoint's Nyquist plane)
def test_gradient_equals_the_per_point_models(grid):
    """∂(Σ w I)/∂θ of MgB₂ equals the per-point model's on the same crystal, in one pass and in chunks inside
    covariance_once (the chunks' ∂/∂S going back through the table's blocks once)."""
    model = springs("MgB2")
    q = on_mesh(model, grid, 24, 4.0)
    w = torch.as_tensor(np.random.default_rng(2).normal(size=len(q)))
    fft = FFTModel(model, T, grid=grid, voxels=q, tail=1e-10)

    def gradient(tds, chunks=1):
        model.theta.grad = None
        with tds.covariance_once():
            for part in np.array_split(np.arange(len(q)), chunks):
                (tds(q[part]) * w[part]).sum().backward()
        return model.theta.grad.clone().numpy()

    model.theta.requires_grad_(True)
    theirs = gradient(GaussianModel(model, T, grid=grid, refine=False))
    model.theta.grad = None
    (fft(q) * w).sum().backward()
    scale = np.abs(theirs).max()
    assert np.abs(model.theta.grad.numpy() - theirs).max() <= 1e-8 * scale
    assert np.abs(gradient(fft, chunks=3) - theirs).max() <= 1e-8 * scale


def test_a_table_too_large_is_built_in_blocks(monkeypatch):
    """A table beyond TABLE_BYTES is built a few columns at a time (each block applied to every voxel): the same
    intensities."""
    import ase_tds.forward.fft as fft_module

    model = springs("NaCl")
    grid = (5, 5, 5)
    q = on_mesh(model, grid, 20, 5.0)
    with torch.no_grad():
        whole = FFTModel(model, T, grid=grid, voxels=q)(q).numpy()
        monkeypatch.setattr(fft_module, "TABLE_BYTES", 2**18)
        blocks = FFTModel(model, T, grid=grid, voxels=q)(q).numpy()
    np.testing.assert_allclose(blocks, whole, rtol=1e-12)


def test_the_voxels_indices_worked_out_a_chunk_at_a_time_change_nothing(monkeypatch):
    """The voxels' lattice indices and half-spectrum entries in chunks of 7 (boundaries inside the volume): the same
    intensities and gradient as in one chunk, and a point off the crystal is still named by its own index."""
    import ase_tds.forward.fft as fft_module
    import ase_tds.forward.voxels as voxels_module

    model = springs("MgB2")
    grid = (3, 3, 2)
    q = on_mesh(model, grid, 40, 5.0)

    def intensity_and_gradient():
        model.theta.grad = None
        fft = FFTModel(model, T, grid=grid, voxels=q)
        fft(q).sum().backward()
        return fft(q).detach().numpy(), model.theta.grad.numpy().copy()

    whole = intensity_and_gradient()
    for module in (fft_module, voxels_module):
        monkeypatch.setattr(module, "INDEX_CHUNK", 7)
    chunked = intensity_and_gradient()
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-12)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-10, atol=1e-14)
    off = torch.as_tensor(q).clone()
    off[10] += 0.01
    with pytest.raises(ValueError, match=r"\(point 10\)"):
        voxels_module.lattice_index(off, model.primitive.cell[:], grid)


def test_a_subset_of_the_voxels_is_computed_alone():
    """`for_points`: the same crystal and orders for a subset (a first fit's), its sums computed for the subset alone
    (not every voxel of the volume), the same intensities."""
    model = springs("NaCl")
    grid = (4, 4, 4)
    q = torch.as_tensor(on_mesh(model, grid, 60, 5.0))
    fft = FFTModel(model, T, grid=grid, voxels=q)
    subset = fft.for_points(q[::5])
    assert subset.grid == fft.grid and subset.q_max == fft.q_max and len(subset._voxels) == 12
    with torch.no_grad():
        np.testing.assert_allclose(subset(q[::5]).numpy(), fft(q)[::5].numpy(), rtol=1e-12)
    assert len(subset._voxel_sums[1]) == 12


def test_the_blockwise_gradient_equals_the_one_shot_gradient(monkeypatch):
    """MgB₂: ∂(Σ w I)/∂θ with the table in many blocks of columns (forward and backward), one-shot and in chunks inside
    covariance_once (the chunks' ∂/∂S going back through the blocks once), equals the gradient with the table in one
    block; the intensities too."""
    import ase_tds.forward.fft as fft_module

    model = springs("MgB2")
    grid = (4, 4, 5)
    q = on_mesh(model, grid, 40, 4.0, seed=3)
    w = torch.as_tensor(np.random.default_rng(4).normal(size=len(q)))
    model.theta.requires_grad_(True)

    def gradient(chunks=0):
        tds = FFTModel(model, T, grid=grid, voxels=q, tail=1e-10)
        model.theta.grad = None
        if not chunks:
            intensity = tds(q)
            (intensity * w).sum().backward()
        else:
            with tds.covariance_once():
                for part in np.array_split(np.arange(len(q)), chunks):
                    (tds(q[part]) * w[part]).sum().backward()
            with torch.no_grad():
                intensity = tds(q)
        return intensity.detach().numpy(), model.theta.grad.clone().numpy(), len(tds._blocks(
            tds.orders(tds.tables(grid)[0]), grid))

    one_intensity, one_shot, blocks = gradient()
    assert blocks == 1
    tds = FFTModel(model, T, grid=grid, voxels=q, tail=1e-10)
    columns = tds.monomials(tds.orders(tds.tables(grid)[0])).columns
    column_bytes = 6 * 4 * 4 * 3 * 2 * 8  # pairs × half-spectrum entries × (re, im) × float64
    monkeypatch.setattr(fft_module, "TABLE_BYTES", column_bytes * (columns // 7))  # 8 blocks
    scale = np.abs(one_shot).max()
    for chunks in (0, 3):
        intensity, blockwise, blocks = gradient(chunks)
        assert blocks > 5
        np.testing.assert_allclose(intensity, one_intensity, rtol=1e-12)
        assert np.abs(blockwise - one_shot).max() <= 1e-10 * scale
    model.theta.requires_grad_(False)


def test_the_grid_of_a_volume_with_any_steps_and_gaps(rng):
    """Voxels of the conventional fcc cell with steps 1/4, 1/5, 1/3 from an odd origin: every voxel lies on the found
    crystal's q mesh, on no crystal with a prime factor fewer along any axis, and the same with 40 % of the voxels
    gone; random points lie on none."""
    model = springs("Ni")
    cell = model.primitive.cell[:]
    hkl = hkl_grid((0.1, -0.35, 1 / 3), (1 / 4, 1 / 5, 1 / 3), (6, 7, 5))
    q = torch.as_tensor(reciprocal_q(hkl, model.unitcell.cell[:]))
    grid = commensurate_grid(q, cell)
    mesh_index(q, cell, grid)  # every voxel on the mesh
    for axis in range(3):
        for prime in (2, 3, 5, 7):
            if grid[axis] % prime == 0:
                fewer = list(grid)
                fewer[axis] //= prime
                with pytest.raises(ValueError, match="not on the reciprocal lattice"):
                    mesh_index(q, cell, fewer)
    kept = rng.random(len(q)) > 0.4
    assert commensurate_grid(q[kept], cell) == grid
    assert commensurate_grid(rng.uniform(-3, 3, size=(50, 3)), cell) is None


def test_points_off_the_crystal_are_refused():
    model = springs("Ni")
    q = on_mesh(model, (4, 4, 4), 5, 5.0)
    fft = FFTModel(model, T, grid=(4, 4, 4), voxels=q, q_max=8.0)
    with pytest.raises(ValueError, match="not on the reciprocal lattice of the 4×4×4 crystal"):
        fft(q + 0.01)
    with pytest.raises(ValueError, match="regular hkl grid"):
        FFTModel(model, T, voxels=np.random.default_rng(0).uniform(-3, 3, size=(20, 3)))


def test_the_default_crystal_is_converged():
    """Ni voxels around the Bragg peak 111, the nearest 0.22 Å⁻¹ (< 1.25 mesh spacings of the per-point converged
    grid) from it: the default fft crystal is a multiple of the voxels' own, at least 3 × the per-point converged grid
    (its near-Bragg factor there), within 1e-3 (median) of a per-point model on a grid twice the converged one (near
    Bragg 4× and 6×), and its own error estimate says so."""
    model = springs("Ni")
    hkl = hkl_grid((0.75, 0.75, 0.875), (1 / 8, 1 / 8, 1 / 8), (5, 5, 3))
    q = reciprocal_q(hkl[np.abs(hkl - 1).max(axis=1) > 0], model.unitcell.cell[:])  # 111 itself left out
    fft = FFTModel(model, T, voxels=q)
    assert all(g >= 3 * c and g % v == 0 for g, c, v in zip(fft.grid, fft.converged_grid, fft.voxel_grid))
    with torch.no_grad():
        ours = fft(q).numpy()
        limit = GaussianModel(model, T, grid=tuple(2 * g for g in fft.converged_grid), q_max=fft.q_max)(q).numpy()
        error = fft.discretisation_error(q).numpy()
    assert np.median(np.abs(ours / limit - 1)) < 1e-3
    assert np.median(error / ours) < 1e-3


@pytest.mark.filterwarnings("ignore:the data do not determine")  # noise-free data: σ = 1
def test_simulate_and_fit_take_the_fft_route_on_a_grid(tmp_path):
    """hkl on a regular grid: simulate and fit choose "fft" by themselves and record it (fit.json's settings); the
    fit recovers the constants; random hkl stay on the per-point route."""
    truth = springs("Ni")
    hkl = hkl_grid((0.0, 0.0, 0.0), (1 / 3, 1 / 3, 1 / 3), (7, 7, 7))
    hkl = hkl[np.abs(hkl - np.round(hkl)).max(axis=1) > 0]
    data = simulate(truth, hkl, T, rng=0)
    assert data.provenance["model"]["method"] == "fft"
    random = simulate(truth, np.random.default_rng(0).uniform(0.2, 2.0, size=(6, 3)), T)
    assert random.provenance["model"]["method"] == "gaussian"
    start = copy.deepcopy(truth)
    with torch.no_grad():
        start.theta.mul_(0.9)
    result = fit(start, data, progress=False, explain_misfit=False)
    assert result.settings["method"] == "fft" and result.settings["grid"] == data.provenance["model"]["grid"]
    true = truth.theta.detach().numpy()
    assert np.abs(start.theta.detach().numpy() - true).max() < 1e-6 * np.abs(true).max()
    result.write_json(tmp_path / "fit.json")
    assert '"method": "fft"' in (tmp_path / "fit.json").read_text()


def test_the_route_is_chosen_at_one_place():
    """tds_model: "gaussian" with voxels on a grid → fft (unless a per-point grid is asked for); off a grid →
    gaussian."""
    model = springs("Ni")
    q = reciprocal_q(hkl_grid((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (3, 3, 3)), model.unitcell.cell[:])
    assert type(tds_model(model, T, voxels=q)) is FFTModel
    assert type(tds_model(model, T, voxels=q, grid=(5, 5, 5))) is GaussianModel
    assert type(tds_model(model, T, voxels=q + 0.0123)) is GaussianModel
    assert type(tds_model(model, T, method="one-phonon", voxels=q)).name == "one-phonon"
