"""distill-pipe: distil causal LMs from precomputed teacher logits stored in Zarr.

The public API for your own training loop (docs/own-training-loop.md) is importable from here:
`from distill_pipe import open_store, StoreDataset, Collate, EpochSampler, DistillLoss`. It is loaded on first
use, so `import distill_pipe` (and the CLI) stays light.
"""

__version__ = "0.1.0"

_API = ("Collate", "DistillLoss", "EpochSampler", "StoreDataset", "global_token_count", "make_optimizer",
        "make_scheduler", "open_store")
__all__ = ["__version__", *_API]


def __getattr__(name: str):  # PEP 562: the API module is imported on first use, by none of the stages
    if name in _API:
        import importlib

        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module 'distill_pipe' has no attribute {name!r}")
