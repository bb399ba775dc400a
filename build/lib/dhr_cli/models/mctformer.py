"""MCTformer-V2 (xulianuwa/MCTformer, `deit_small_MCTformerV2_patch16_224`) as a WSS CAM network.

State dict (the `model` entry of the authors' checkpoint.pth; its `args` Namespace is read inert):
cls_token (1, C, D) -- one class token per foreground class --, pos_embed (1, C + 14*14, D),
patch_embed.proj, blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2, norm (unused at
inference, as in the authors' forward), head = Conv2d(D, C, 3, padding 1) on the patch tokens.
DeiT-S: D 384, 12 blocks, 6 heads, patch 16, LayerNorm eps 1e-6.

CAMs as the authors generate them (`--attention-type fused --layer-index 3 --patch-attn-refine`):
attention averaged over heads; class-to-patch attention summed over the last 3 blocks, times
relu(head(patch tokens)); then refined with the patch-to-patch attention summed over all blocks.
Features: the last block's patch tokens (B, D, H/16, W/16) (no final norm, as the authors' head sees them).
"""

from __future__ import annotations

import torch
from torch import nn

from dhr_cli.errors import CheckpointError
from dhr_cli.models.base import FeatureSource, check_images
from dhr_cli.models.checkpoints import load_state_dict, load_strict
from dhr_cli.models.vit import resample_patch_pos, timm_vit


class MCTformerV2(FeatureSource):
    """MCTformer-V2 CAM network with the authors' parameter names."""

    kind = "wss"
    base_side = None

    def __init__(self, num_classes: int = 20, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 patch_size: int = 16, img_size: int = 224, layer_index: int = 3, patch_attn_refine: bool = True,
                 classes: list[str] | None = None, dino_compat_interp: bool = True):
        super().__init__()
        vit = timm_vit(embed_dim, depth, num_heads, patch_size, img_size)
        n = (img_size // patch_size) ** 2
        self.name = "mctformer"
        self.num_classes, self.embed_dim, self.num_heads = num_classes, embed_dim, num_heads
        self.stride = self.multiple = patch_size
        self.layer_index, self.patch_attn_refine = layer_index, patch_attn_refine
        self.dino_compat_interp = dino_compat_interp
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_classes + n, embed_dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = vit.patch_embed.proj
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.head = nn.Conv2d(embed_dim, num_classes, 3, padding=1)
        self.classes = list(classes) if classes else [f"class{i}" for i in range(num_classes)]
        self.feature_dims = (embed_dim,)

    def _block(self, blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One timm block, returning the head-averaged attention (B, N, N) as well."""
        b, n, d = x.shape
        h = self.num_heads
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (d // h) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        x = x + blk.mlp(blk.norm2(x))
        return x, attn.mean(1)

    def extract(self, images: torch.Tensor) -> dict:
        """(B, 3, H, W) ImageNet-normalised, sides multiples of 16 ->
        {"features": [(B, D, H/16, W/16)], "cams": (B, C, H/16, W/16) >= 0}."""
        check_images(images, self.stride)
        b, _, hh, ww = images.shape
        gh, gw = hh // self.stride, ww // self.stride
        c = self.num_classes
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
        pos = resample_patch_pos(self.pos_embed[:, c:], gh, gw, self.dino_compat_interp)
        x = x + torch.cat([self.pos_embed[:, :c], pos], 1)
        cls_attn = patch_attn = None
        depth = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            x, a = self._block(blk, x)
            pa = a[:, c:, c:]
            patch_attn = pa if patch_attn is None else patch_attn + pa
            if i >= depth - self.layer_index:
                ca = a[:, :c, c:]
                cls_attn = ca if cls_attn is None else cls_attn + ca
        feats = x[:, c:].transpose(1, 2).reshape(b, -1, gh, gw)
        cams = cls_attn * torch.relu(self.head(feats)).flatten(2)  # (B, C, N)
        if self.patch_attn_refine:
            cams = cams @ patch_attn.transpose(1, 2)  # cam'[c, i] = sum_j A[i, j] cam[c, j]
        return {"features": [feats], "cams": cams.reshape(b, c, gh, gw)}

    @classmethod
    def from_checkpoint(cls, path, classes: list[str] | None = None, trust: bool = False, **kw) -> "MCTformerV2":
        sd = load_state_dict(path, trust)
        ct, w = sd.get("cls_token"), sd.get("patch_embed.proj.weight")
        if ct is None or w is None or "head.weight" not in sd:
            raise CheckpointError(f"{path}: not an MCTformer-V2 checkpoint (needs cls_token, patch_embed.proj.weight, head.weight)")
        c, d, p = int(ct.shape[1]), int(ct.shape[2]), int(w.shape[-1])
        if classes is not None and len(classes) != c:
            raise CheckpointError(f"{path}: {c} class tokens but the dataset has {len(classes)} foreground classes")
        n = int(sd["pos_embed"].shape[1]) - c if "pos_embed" in sd else 196
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        side = int(round(n ** 0.5))
        net = cls(c, d, depth, max(1, d // 64), p, side * p, classes=classes, **kw)
        load_strict(net, sd, path)
        return net
