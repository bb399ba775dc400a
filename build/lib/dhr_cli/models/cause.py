"""CAUSE-TR (ByungKwanLee/Causal-Unsupervised-Segmentation) on DINOv2 ViT-B/14, as DHR runs it (docs/peers.md).

DHR's packed `CAUSE_{dataset}.pt` = {'decoder': Segment_TR state dict (head_ema.* only),
'codebook': (2048, D) mediator codebook}. The head (`head_ema`):
- query_pos (num_queries, D), num_queries = (322 / 14)^2 = 529, resampled linearly to the patch count;
- tr: one post-norm transformer decoder layer (nn.MultiheadAttention, 1 head, sequence-first):
  self_attn, multihead_attn, linear1 (D -> 2048), linear2, norm1..3, then f1 + f2 1x1 convs
  (f1 = Conv(D, 90); f2 = Conv(D, D), ReLU, Conv(D, 90)).
Inference: f = post-norm patch tokens; tgt = the codebook vector nearest to f (cosine);
self-attention on tgt + pos, cross-attention to f, FFN, then memory + norm3(tgt) -> f1 + f2 -> (B, 90, h, w).
The backbone is a separate DINOv2 file (`backbone_weights`, dinov2_vitb14_pretrain.pth).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dhr_cli.errors import CheckpointError
from dhr_cli.models.base import FeatureSource
from dhr_cli.models.checkpoints import load_strict, read_checkpoint
from dhr_cli.models.vit import DinoViT, load_vit

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"


class TRDecoder(nn.Module):
    """CAUSE's decoder layer; parameter names as in the authors' `TRDecoder`."""

    def __init__(self, dim: int, reduced_dim: int = 90, hidden_dim: int = 2048, nhead: int = 1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead)
        self.multihead_attn = nn.MultiheadAttention(dim, nhead)
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.f1 = nn.Conv2d(dim, reduced_dim, 1)
        self.f2 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, reduced_dim, 1))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tgt, memory (N, B, D); pos (N, 1, D) -> (B, reduced_dim, h, w) with h * w = N."""
        q = tgt + pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt + pos, memory, memory, need_weights=False)[0])
        tgt = tgt + self.linear2(F.relu(self.linear1(tgt)))
        tgt = memory + self.norm3(tgt)
        n, b, d = tgt.shape
        x = tgt.permute(1, 2, 0).reshape(b, d, *grid)
        return self.f1(x) + self.f2(x)


class CauseHead(nn.Module):
    """`head_ema`: query_pos + TRDecoder; the codebook is a buffer (not in the decoder's state dict)."""

    def __init__(self, dim: int = 768, reduced_dim: int = 90, num_queries: int = 529, num_codebook: int = 2048):
        super().__init__()
        self.query_pos = nn.Parameter(torch.zeros(num_queries, dim))
        self.tr = TRDecoder(dim, reduced_dim)
        self.register_buffer("codebook", torch.zeros(num_codebook, dim), persistent=False)

    def forward(self, feat: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """feat (B, N, D) post-norm patch tokens, N = h * w -> (B, reduced_dim, h, w)."""
        b, n, d = feat.shape
        sim = F.normalize(feat, dim=-1) @ F.normalize(self.codebook, dim=-1).t()
        vq = self.codebook[sim.argmax(-1)]  # (B, N, D): the nearest codebook vector (cosine)
        pe = F.interpolate(self.query_pos.t()[None], size=n, mode="linear", align_corners=False)[0].t()
        return self.tr(vq.transpose(0, 1), feat.transpose(0, 1), pe.unsqueeze(1), grid)


class CauseSource(FeatureSource):
    """CAUSE-TR codes (B, 90, H/14, W/14) on a DINOv2 backbone (USS)."""

    def __init__(self, vit: DinoViT, head: CauseHead):
        super().__init__()
        self.name, self.kind = "cause", "uss"
        self.vit, self.head = vit, head
        self.stride = self.multiple = vit.patch_size
        self.feature_dims = (head.tr.f1.out_channels,)

    def extract(self, images: torch.Tensor) -> dict:
        """(B, 3, H, W) ImageNet-normalised, sides multiples of p -> {"features": [(B, 90, H/p, W/p)], "cams": None}."""
        h, w = images.shape[-2] // self.stride, images.shape[-1] // self.stride
        return {"features": [self.head(self.vit.patch_tokens(images), (h, w))], "cams": None}

    @classmethod
    def from_checkpoint(cls, path, backbone_weights=None, trust: bool = False) -> "CauseSource":
        """DHR's packed {'decoder', 'codebook'} file + the DINOv2 backbone file."""
        obj = read_checkpoint(path, trust)
        if not (isinstance(obj, dict) and "decoder" in obj and "codebook" in obj):
            keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: not DHR's packed CAUSE file (expected keys 'decoder' and 'codebook', found {keys})")
        dec, codebook = obj["decoder"], obj["codebook"]
        if hasattr(codebook, "__array__") and not isinstance(codebook, torch.Tensor):
            codebook = torch.as_tensor(codebook)
        if not isinstance(dec, dict) or not isinstance(codebook, torch.Tensor) or codebook.ndim != 2:
            raise CheckpointError(f"{path}: 'decoder' must be a state dict and 'codebook' a (K, D) tensor")
        sd = {k[len("head_ema."):]: v for k, v in dec.items() if k.startswith("head_ema.")}
        extra = [k for k in dec if not k.startswith("head_ema.") and not k.startswith("head.")]
        if not sd or extra:
            raise CheckpointError(f"{path}: 'decoder' should hold head_ema.* keys only"
                                  + (f"; unexpected {extra[:5]}" if extra else "; none found"))
        qp, f1 = sd.get("query_pos"), sd.get("tr.f1.weight")
        if qp is None or f1 is None:
            raise CheckpointError(f"{path}: missing {'head_ema.query_pos' if qp is None else 'head_ema.tr.f1.weight'}")
        if codebook.shape[1] != qp.shape[1]:
            raise CheckpointError(f"{path}: codebook is {tuple(codebook.shape)} but the decoder is {qp.shape[1]}-d")
        head = CauseHead(qp.shape[1], f1.shape[0], qp.shape[0], codebook.shape[0])
        load_strict(head, sd, f"{path} ['decoder'] (head_ema.)")
        head.codebook.copy_(codebook.float())
        if backbone_weights is None:
            raise CheckpointError(f"{path}: CAUSE needs --backbone-weights, the DINOv2 ViT-B/14 it was trained on "
                                  f"({DINOV2_URL})")
        vit = load_vit(backbone_weights, trust=trust)
        if vit.embed_dim != qp.shape[1]:
            raise CheckpointError(f"{backbone_weights}: a {vit.embed_dim}-d backbone, but the CAUSE head is {qp.shape[1]}-d")
        return cls(vit, head)
