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
    assert {"ForceConstantModel", "TDSModel", "fit", "FitResult", "DenseSampler", "QSpaceSampler",
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
