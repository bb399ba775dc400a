"""A tiny Segment Anything built from the package's own classes, for tests that must stay fast.

Same modules and key names as the official models (ImageEncoderViT, PromptEncoder, MaskDecoder,
TwoWayTransformer), with a 64 px input, 2 blocks of width 16 and a 16-wide prompt space: a
forward pass takes milliseconds. Its weights are random, so its masks mean nothing; what it
tests is the plumbing (prompts in, masks out, stores, resume).
"""

from __future__ import annotations

from functools import partial

import torch

TINY = dict(img_size=64, patch_size=16, embed_dim=16, depth=2, num_heads=2, prompt_dim=16)


def tiny_sam(seed: int = 0):
    """The tiny SAM with random weights drawn from `seed` (eval mode, CPU)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    t = TINY
    grid = t["img_size"] // t["patch_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=t["img_size"], patch_size=t["patch_size"], embed_dim=t["embed_dim"], depth=t["depth"],
                num_heads=t["num_heads"], mlp_ratio=2, out_chans=t["prompt_dim"], qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=2,
                global_attn_indexes=[t["depth"] - 1]),
            prompt_encoder=PromptEncoder(embed_dim=t["prompt_dim"], image_embedding_size=(grid, grid),
                                         input_image_size=(t["img_size"], t["img_size"]), mask_in_chans=4),
            mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                     transformer=TwoWayTransformer(depth=1, embedding_dim=t["prompt_dim"], mlp_dim=32,
                                                                   num_heads=2),
                                     transformer_dim=t["prompt_dim"], iou_head_depth=2, iou_head_hidden_dim=16),
        )
    return sam.eval()


def tiny_sam_type(name: str = "vit_tiny"):
    """A SamType for the tiny model, to register in dhr_cli.models.sam.SAM_TYPES (tests, benchmarks)."""
    from dhr_cli.models.sam import SamType

    return SamType(name, TINY["embed_dim"], TINY["depth"], None, build=tiny_sam)
