"""The core module: every numerical kernel of dhr, shared by all commands.

Pure batched tensor functions, no I/O: they follow their inputs' device and dtype, so the same
code runs on CUDA when present and on the CPU otherwise.

    sinkhorn.py    f_OT: batched Sinkhorn with the authors' stopping rule (and POT's solver)
    dhr.py         steps 1-3: CAM normalisation and OT seeds, majority pooling, prototypes,
                   cosine heat-maps, correlation groups, group-wise and global rebalancing
    crf.py         mean-field dense CRF (Gaussian + bilateral kernels)
    randomwalk.py  PSA/AffinityNet random walk, the baseline `dhr propagate --method rw`
"""

from dhr_cli.kernels.checks import check_shape
from dhr_cli.kernels.dhr import (
    PropagateItem,
    class_prototypes,
    correlation_groups,
    cosine_heatmap,
    majority_pool,
    normalize_cams,
    propagate_items,
    rebalance,
    resize,
    seed_masks,
    seed_probabilities,
    seeded_marginals,
)
from dhr_cli.kernels.sinkhorn import SinkhornResult, f_ot, minmax_columns, sinkhorn, sinkhorn_pot

__all__ = [
    "PropagateItem", "SinkhornResult", "check_shape", "class_prototypes", "correlation_groups", "cosine_heatmap",
    "f_ot", "majority_pool", "minmax_columns", "normalize_cams", "propagate_items", "rebalance", "resize",
    "seed_masks", "seed_probabilities", "seeded_marginals", "sinkhorn", "sinkhorn_pot",
]  # fmt: skip
