"""DINO ViT-S/B (patch 8/16) and DINOv2 ViT-B/14 backbones with DINO's state-dict names (docs/peers.md).

The transformer blocks are timm's (`VisionTransformer`, the same parameter names as DINO:
cls_token, pos_embed, patch_embed.proj, blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2,
norm; DINOv2 adds blocks.{i}.ls1/ls2.gamma and mask_token), so official state dicts load strictly.
The token preparation is ours: CLS token + the position embedding resampled to the input grid
(bicubic; DINO's / DINOv2's "+0.1" scale-factor quirk behind `dino_compat_interp`). Features are
the last block's output after the final norm, patch tokens as (B, D, H/p, W/p), which is what
STEGO (`get_intermediate_feat`), CAUSE and DHR (`forward_features(x)[:, 1:]`) use.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dhr_cli.errors import CheckpointError, InputError
from dhr_cli.models.base import FeatureSource, check_images
from dhr_cli.models.checkpoints import (
    load_strict,
    read_checkpoint,
    select_prefix,
    strip_prefixes,
    unwrap,
)

logger = logging.getLogger(__name__)

# name -> (embed_dim, depth, heads, patch, img_size, layerscale, mask_token)
ARCHS = {
    "dino_vits8": (384, 12, 6, 8, 224, False, False),
    "dino_vits16": (384, 12, 6, 16, 224, False, False),
    "dino_vitb8": (768, 12, 12, 8, 224, False, False),
    "dino_vitb16": (768, 12, 12, 16, 224, False, False),
    "dinov2_vitb14": (768, 12, 12, 14, 518, True, True),
}


def timm_vit(embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int,
             layerscale: bool = False) -> nn.Module:
    """timm's VisionTransformer (no classifier) configured like DINO: qkv bias, LayerNorm eps 1e-6, mlp x4."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=1.0 if layerscale else None)


def resample_patch_pos(pos: torch.Tensor, gh: int, gw: int, dino_compat_interp: bool = True) -> torch.Tensor:
    """Patch position embedding (1, N, D) on a square grid -> (1, gh*gw, D), bicubic.

    dino_compat_interp: DINO/DINOv2/MCTformer resize with scale_factor (g + 0.1) / sqrt(N) (dino#8);
    otherwise with an explicit size. Both give the same grid size; values differ slightly.
    """
    n = pos.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"position embedding of {n} patch tokens is not a square grid")
    if (gh, gw) == (side, side):
        return pos
    grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    if dino_compat_interp:
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic",
                             align_corners=False)
    else:
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != (gh, gw):
        raise CheckpointError(f"position embedding resized to {tuple(grid.shape[-2:])}, expected {(gh, gw)}")
    return grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)


class DinoViT(nn.Module):
    """A DINO / DINOv2 ViT backbone (no classifier) with DINO's state-dict names."""

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 6, patch_size: int = 16,
                 img_size: int = 224, layerscale: bool = False, mask_token: bool = False,
                 dino_compat_interp: bool = True):
        super().__init__()
        vit = timm_vit(embed_dim, depth, num_heads, patch_size, img_size, layerscale)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.dino_compat_interp = dino_compat_interp
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.patch_embed = nn.Module()
        self.patch_embed.proj = vit.patch_embed.proj
        self.blocks = vit.blocks
        self.norm = vit.norm
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # DINOv2 (unused at inference)

    def interpolate_pos_encoding(self, gh: int, gw: int) -> torch.Tensor:
        """(1, 1 + gh*gw, D) position embedding for a gh x gw patch grid (bicubic)."""
        pos = self.pos_embed
        if gh * gw == pos.shape[1] - 1 and gh == gw:
            return pos
        return torch.cat([pos[:, :1], resample_patch_pos(pos[:, 1:], gh, gw, self.dino_compat_interp)], 1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.patch_size)
        b, _, h, w = x.shape
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], 1)
        return t + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The last `n` blocks' outputs after the final norm, (B, 1 + N, D) each."""
        t = self.prepare_tokens(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i >= len(self.blocks) - n:
                outs.append(self.norm(t))
        return outs

    def block_outputs(self, x: torch.Tensor, indices) -> list[torch.Tensor]:
        """The outputs of blocks `indices` (0-based, ascending) after the final norm, (B, 1 + N, D) each."""
        t = self.prepare_tokens(x)
        wanted, outs = set(indices), []
        for i, blk in enumerate(self.blocks[: max(indices) + 1]):
            t = blk(t)
            if i in wanted:
                outs.append(self.norm(t))
        return outs

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of p -> (B, N, D) post-norm patch tokens of the last block."""
        return self.get_intermediate_layers(x, 1)[0][:, 1:]

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of p -> (B, D, H/p, W/p) post-norm patch tokens."""
        b, _, h, w = x.shape
        return self.patch_tokens(x).transpose(1, 2).reshape(b, -1, h // self.patch_size, w // self.patch_size)


def build_vit(name: str, **kw) -> DinoViT:
    if name not in ARCHS:
        raise CheckpointError(f"unknown ViT {name!r}; expected one of {', '.join(ARCHS)}")
    d, depth, heads, p, img, ls, mt = ARCHS[name]
    return DinoViT(d, depth, heads, p, img, ls, mt, **kw)


def vit_from_state(sd: dict, where="checkpoint", **kw) -> DinoViT:
    """A DinoViT shaped like state dict `sd` (dim, depth, patch, grid, LayerScale, mask token; D/64 heads)."""
    w, pos = sd.get("patch_embed.proj.weight"), sd.get("pos_embed")
    if w is None or pos is None:
        raise CheckpointError(f"{where}: no ViT backbone keys (patch_embed.proj.weight, pos_embed) found")
    d, p = int(w.shape[0]), int(w.shape[-1])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    side = math.isqrt(int(pos.shape[1]) - 1)
    return DinoViT(d, depth, max(1, d // 64), p, side * p, "blocks.0.ls1.gamma" in sd, "mask_token" in sd, **kw)


def backbone_state(obj, where) -> dict:
    """The ViT weights of a DINO file: a plain backbone state dict, or a full training checkpoint
    ({'teacher': {'module.backbone.*', 'module.head.*'}, ...}: the teacher's backbone, head dropped)."""
    sd = strip_prefixes(unwrap(obj, where), ("module.",))
    if any(k.startswith("backbone.") for k in sd):
        dropped = sorted({k.split(".")[0] for k in sd if not k.startswith("backbone.")})
        if dropped:
            logger.info("%s: using backbone.* weights, ignoring %s", where, ", ".join(dropped))
        sd = select_prefix(sd, "backbone.")
    return sd


def load_vit(path, name: str | None = None, trust: bool = False, **kw) -> DinoViT:
    """A DinoViT from a DINO / DINOv2 weights file, strictly; `name` pins the architecture (else inferred)."""
    sd = backbone_state(read_checkpoint(path, trust), path)
    vit = build_vit(name, **kw) if name else vit_from_state(sd, path, **kw)
    load_strict(vit, sd, path)
    return vit


class ViTSource(FeatureSource):
    """USS features of a DINO / DINOv2 backbone: (B, D, H/p, W/p) post-norm patch tokens."""

    def __init__(self, vit: DinoViT, name: str = "dino"):
        super().__init__()
        self.vit = vit
        self.name = name
        self.kind = "uss"
        self.stride = self.multiple = vit.patch_size
        self.strides = (vit.patch_size,)
        self.feature_dims = (vit.embed_dim,)
        self.layer_names = tuple(f"blocks.{i}" for i in range(len(vit.blocks)))
        self.feature_layers = (self.layer_names[-1],)
        self._blocks: list[int] | None = None  # None: the last block (patch_features)

    def configure_features(self, layers=(), stride: int | None = None) -> None:
        """Patch tokens of several blocks (`blocks.i`, or `lastK` for the last K), each L2-normalised and
        concatenated. The grid is the patch grid: a finer one comes from larger inputs (--side, --scales)."""
        if stride is not None and stride != self.stride:
            raise InputError(f"--feature-stride {stride}: a ViT's features are on its patch grid (stride "
                             f"{self.stride}); use --side or --scales for a finer grid")
        expanded = []
        for layer in layers:
            name = str(layer).strip()
            if name.startswith("last") and name[4:].isdigit():
                k = int(name[4:])
                if not 1 <= k <= len(self.layer_names):
                    raise InputError(f"--feature-layers {name}: network {self.name!r} has {len(self.layer_names)} blocks")
                expanded.extend(self.layer_names[-k:])
            else:
                expanded.append(name)
        names = self._check_layers(expanded)
        self._blocks = sorted(int(n.split(".")[1]) for n in names) if names else None
        self.feature_layers = tuple(f"blocks.{i}" for i in self._blocks) if names else (self.layer_names[-1],)
        self.feature_dims = (self.vit.embed_dim,) * len(self.feature_layers)
        self.layer_norm = bool(names)

    def extract(self, images: torch.Tensor) -> dict:
        """(B, 3, H, W) ImageNet-normalised, sides multiples of p -> {"features": [(B, D, H/p, W/p)] (one per
        chosen block), "cams": None}."""
        if self._blocks is None:
            return {"features": [self.vit.patch_features(images)], "cams": None}
        b, _, h, w = images.shape
        p = self.vit.patch_size
        return {"features": [t[:, 1:].transpose(1, 2).reshape(b, -1, h // p, w // p)
                             for t in self.vit.block_outputs(images, self._blocks)], "cams": None}

    @classmethod
    def from_checkpoint(cls, name: str, path, trust: bool = False) -> "ViTSource":
        """`name` a key of ARCHS (architecture checked strictly) or "dino" (inferred from the weights)."""
        vit = load_vit(path, name if name in ARCHS else None, trust)
        return cls(vit, name)

