"""dhr: dense pseudo segmentation masks from image-level labels with DHR (ECCV 2024).

The library API lives in the modules below (store, data, kernels, seed, propagate, ...);
the command line in `dhr_cli.cli` is a thin layer over it.
"""

__version__ = "0.1.0"
