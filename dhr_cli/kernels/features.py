"""Per-image low-rank compression of a feature map, for stores of WSS features.

Steps 2-3 use a store's features only through inner products between the cells of one image
(prototypes are means of cells, heat-maps are cosines between cells and prototypes; bilinear
resizing and mean pooling are linear). Projecting an image's (D, h, w) map onto the top-k left
singular vectors of its own (D, h*w) matrix keeps those inner products as well as any rank-k map
can (Eckart-Young), and mean pooling and resizing commute with the projection. A ResNet-50's
3072 channels (layer3 + layer4) take about 4.5 MB an image in float16; rank 128 about 0.3 MB.
Features so stored are in a per-image basis: comparable within an image, not across images.
"""

from __future__ import annotations

import torch

# svd_lowrank draws its test matrix from torch's global generator; a fixed seed makes the stored
# features a pure function of the input (resume and reruns write the same bytes).
_SEED = 0


def low_rank_features(features: torch.Tensor, rank: int, niter: int = 4) -> torch.Tensor:
    """(D, h, w) -> (min(rank, D, h*w), h, w): coordinates of each cell on the map's top singular
    vectors (randomised SVD, deterministic). A map with at most `rank` channels is returned as is."""
    if features.ndim != 3:
        raise ValueError(f"features must be (D, h, w), got {tuple(features.shape)}")
    d, h, w = features.shape
    k = min(rank, d, h * w)
    if d <= rank:
        return features
    x = features.reshape(d, h * w).float()
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_SEED)
        u, _, _ = torch.svd_lowrank(x, q=min(k + 8, d, h * w), niter=niter)
    coords = u[:, :k].T @ x  # (k, M): u has orthonormal columns, so <coords_i, coords_j> ~ <x_i, x_j>
    return coords.reshape(k, h, w).to(features.dtype)
