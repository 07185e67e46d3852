"""The package's top-level names: what `ase_tds.__all__` lists imports, and what the API docs promise is there."""

import importlib
import re
from pathlib import Path

import ase_tds

API_INDEX = Path(__file__).resolve().parents[1] / "docs" / "api" / "index.md"


def promised_names() -> set[str]:
    """The names the sentence of docs/api/index.md that ends "importable from `ase_tds` directly" lists."""
    text = " ".join(API_INDEX.read_text(encoding="utf-8").split())
    sentences = [s for s in re.split(r"(?<=\.)\s", text) if "importable from `ase_tds` directly" in s]
    assert len(sentences) == 1, sentences
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", sentences[0])) - {"ase_tds"}


def test_every_name_in_all_is_importable():
    assert len(set(ase_tds.__all__)) == len(ase_tds.__all__)
    namespace = {}
    exec("from ase_tds import *", namespace)
    for name in ase_tds.__all__:
        assert name in namespace, name
        assert getattr(importlib.import_module("ase_tds"), name) is namespace[name]


def test_names_the_docs_promise_are_exported():
    promised = promised_names()
    assert {"ForceConstantModel", "tds_model", "fit", "FitResult", "DenseSampler", "QSpaceSampler",
            "StructureError", "UnstableError"} <= promised
    assert promised <= set(ase_tds.__all__), promised - set(ase_tds.__all__)


def test_error_types_are_the_ones_raised():
    """The exported errors are the package's own classes, catchable by their ordinary bases too."""
    from ase_tds.covariance import UnstableError
    from ase_tds.data import TDSError
    from ase_tds.structure import StructureError

    assert ase_tds.UnstableError is UnstableError and issubclass(UnstableError, ArithmeticError)
    assert ase_tds.TDSError is TDSError and issubclass(TDSError, ValueError)
    assert ase_tds.StructureError is StructureError and issubclass(StructureError, ValueError)


def test_both_force_constant_sources_satisfy_the_protocol_and_the_kernels_take_either(tmp_path):
    """ForceConstantModel and PhonopyForceConstants are ForceConstantSources; the covariance of a model and of the
    phonopy files written from it agree (an independent route to D(q): phonopy's own dynamical matrix)."""
    import numpy as np
    import torch
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from ase_tds import ForceConstantModel, ForceConstantSource, PhonopyForceConstants, ThermalCovariance
    from ase_tds.io.phonopy import write_phonopy_files

    model = ForceConstantModel(bulk("Cu", "fcc", a=3.6), shells=2).set_from_calculator(EMT(), progress=False)
    write_phonopy_files(model, tmp_path, (4, 4, 4))
    source = PhonopyForceConstants(tmp_path)
    assert isinstance(model, ForceConstantSource) and isinstance(source, ForceConstantSource)
    assert not isinstance(object(), ForceConstantSource)
    assert source.dtype == model.dtype == torch.float64 and source.device == model.device
    q = model.q_from_hkl(np.array([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [1.0, 0.0, 0.0]]))
    with torch.no_grad():
        ours, theirs = (ThermalCovariance(s, 300.0, "quantum")(q) for s in (model, source))
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12 * float(ours.abs().max()))


def test_one_name_from_phonopy_files_to_a_model(tmp_path):
    """ForceConstantModel.from_phonopy reads back the θ of the files it wrote; the old name is gone (0.1)."""
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from ase_tds import ForceConstantModel, calculator
    from ase_tds.io.phonopy import write_phonopy_files

    model = ForceConstantModel(bulk("Ni", "fcc", a=3.52), shells=3).set_from_calculator(EMT(), progress=False)
    write_phonopy_files(model, tmp_path, (4, 4, 4))
    again = ForceConstantModel.from_phonopy(tmp_path)
    assert again.labels == model.labels
    np.testing.assert_allclose(again.theta.detach().numpy(), model.theta.detach().numpy(), atol=1e-9)
    assert not hasattr(calculator, "model_from_phonopy")
