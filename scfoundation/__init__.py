__version__ = "0.1.0"
"""scfoundation: a literate, runnable single-cell foundation model.

`import scfoundation as scf` is cheap: each chapter's module (`scf.data`, `scf.genes`, …)
is imported on first use, so torch is loaded only when a model is needed.
"""
import importlib

_MODULES = ("data", "genes", "tokenization", "simulate", "model", "train", "evaluate", "annotate",
            "integrate", "perturb", "insilico", "grn", "prior", "corpus", "cli")


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_MODULES))
