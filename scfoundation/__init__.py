__version__ = "0.1.0"
"""scfoundation: a literate, runnable single-cell foundation model.

`import scfoundation as scf` is cheap: each chapter's module (`scf.data`, `scf.genes`, …)
is imported on first use, so torch is loaded only when a model is needed.
"""
import importlib
import os
import sys

# numba's default OpenMP threads (scanpy's neighbours, UMAP) and PyTorch's OpenMP threads busy-wait against
# each other on small machines: measured on 2 cores, a training step ran 7x slower after one `sc.pp.neighbors`.
# numba's workqueue layer does not spin. A choice of your own (the variable set before import) is kept.
if "NUMBA_THREADING_LAYER" not in os.environ:
    os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
    if "numba" in sys.modules: sys.modules["numba"].config.THREADING_LAYER = "workqueue"  # imported (by scanpy), not yet started

_MODULES = ("data", "genes", "tokenization", "simulate", "model", "train", "evaluate", "annotate",
            "integrate", "perturb", "insilico", "grn", "prior", "corpus", "cli", "published", "study", "exercises")


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_MODULES))
