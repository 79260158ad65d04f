"""distill-pipe: distil causal LMs from precomputed teacher logits stored in Zarr."""

__version__ = "0.1.0"
