"""The core module: every numerical kernel of dhr, shared by all commands.

Pure batched tensor functions, no I/O: they follow their inputs' device and dtype, so the same
code runs on CUDA when present and on the CPU otherwise. One layout: classes first, (B, N, M)
pixels or (B, N, G) grid cells, so the long axis is the contiguous one.

    sinkhorn.py    f_OT: batched Sinkhorn with the authors' stopping rule (and POT's solver)
    seed.py        step 1: CAM normalisation, OT rebalancing, background competition, seeds
    propagate.py   steps 2-3: majority pooling, prototypes, cosine heat-maps, correlation
                   groups, group-wise and global rebalancing; the CAM baseline
    upsample.py    bilinear resizing and the exact upsampled argmax
    crf.py         mean-field dense CRF (Gaussian + bilateral kernels)
    randomwalk.py  PSA/AffinityNet random walk, the baseline `dhr propagate --method rw`
    metrics.py     confusion matrix, IoU / FPR / FNR
"""

from dhr_cli.kernels.checks import check_shape
from dhr_cli.kernels.propagate import (
    PropagateItem,
    class_prototypes,
    correlation_groups,
    cosine_heatmap,
    majority_pool,
    propagate_items,
    rebalance,
    seeded_marginals,
)
from dhr_cli.kernels.seed import normalize_cams, seed_masks, seed_probabilities
from dhr_cli.kernels.sinkhorn import (
    SinkhornResult,
    f_ot,
    minmax_last,
    sinkhorn,
    sinkhorn_pot,
)
from dhr_cli.kernels.upsample import resize

__all__ = [
    "PropagateItem", "SinkhornResult", "check_shape", "class_prototypes", "correlation_groups", "cosine_heatmap",
    "f_ot", "majority_pool", "minmax_last", "normalize_cams", "propagate_items", "rebalance", "resize",
    "seed_masks", "seed_probabilities", "seeded_marginals", "sinkhorn", "sinkhorn_pot",
]  # fmt: skip
