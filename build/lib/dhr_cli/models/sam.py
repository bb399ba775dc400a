"""Segment Anything (the `segment-anything` package, optional extra `pip install 'dhr[sam]'`).

`load_sam("vit_b", "sam_vit_b_01ec64.pth", device)` builds the package's model with
`sam_model_registry[type](checkpoint=None)` (the package's own builder would call `torch.load`
without `map_location`, which fails on CPU-only machines, and dump a state-dict error for a
wrong model type) and loads the user's file through dhr's one checkpoint reader: tensors only
(weights_only=True), straight onto the device, the model type checked against the file's
encoder width and depth before a strict load that names missing and unexpected keys.
Nothing is ever downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dhr_cli.errors import CheckpointError, InputError, MissingExtraError
from dhr_cli.models.checkpoints import load_state_dict, load_strict

_RELEASE = "https://dl.fbaipublicfiles.com/segment_anything/"
PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


@dataclass(frozen=True)
class SamType:
    """A SAM model type: the image encoder's width and depth tell its checkpoints apart."""

    name: str
    embed_dim: int
    depth: int
    official_file: str | None = None
    build: Callable[[], nn.Module] | None = None  # None: the package's sam_model_registry[name]


SAM_TYPES: dict[str, SamType] = {
    "vit_b": SamType("vit_b", 768, 12, "sam_vit_b_01ec64.pth"),
    "vit_l": SamType("vit_l", 1024, 24, "sam_vit_l_0b3195.pth"),
    "vit_h": SamType("vit_h", 1280, 32, "sam_vit_h_4b8939.pth"),
}

__all__ = ["PARTS", "SAM_TYPES", "SamType", "build_sam", "encoder_shape", "load_sam", "require_segment_anything",
           "sam_type"]


def require_segment_anything():
    """The `segment_anything` module, or a one-line error naming the extra to install."""
    try:
        import segment_anything
    except ImportError:
        raise MissingExtraError("Segment Anything is not installed (the segment-anything package): "
                                "pip install 'dhr[sam]'") from None
    return segment_anything


def sam_type(name: str) -> SamType:
    key = name.lower().replace("-", "_")
    if key == "default":
        key = "vit_h"
    if key not in SAM_TYPES:
        raise InputError(f"--sam {name!r}: expected {', '.join(SAM_TYPES)}")
    return SAM_TYPES[key]


def build_sam(name: str) -> nn.Module:
    """The package's SAM of this type with random weights (eval mode, on the CPU)."""
    kind = sam_type(name)
    if kind.build is not None:
        return kind.build().eval()
    from segment_anything import sam_model_registry

    return sam_model_registry[kind.name](checkpoint=None).eval()


def encoder_shape(sd: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(width, depth) of the ViT image encoder in a SAM state dict, None if it has no such encoder."""
    patch = sd.get("image_encoder.patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    if patch is None or patch.ndim != 4 or not blocks:
        return None
    return int(patch.shape[0]), max(blocks) + 1


def _check_type(sd: dict[str, torch.Tensor], path: Path, kind: SamType) -> None:
    """One line when the file is not SAM, or is a SAM of another type than the one asked for."""
    if not any(k.startswith(PARTS) for k in sd):
        raise CheckpointError(f"{path}: not a Segment Anything checkpoint (no image_encoder. / prompt_encoder. / "
                              f"mask_decoder. keys; first keys {', '.join(list(sd)[:3])})")
    if any(k.startswith("mask_decoder.hf_") for k in sd):
        raise CheckpointError(f"{path}: an HQ-SAM checkpoint (mask_decoder.hf_* keys); dhr refine takes the original "
                              f"SAM weights ({', '.join(t.official_file for t in SAM_TYPES.values() if t.official_file)})")
    shape = encoder_shape(sd)
    if shape is None:
        raise CheckpointError(f"{path}: its image encoder is not SAM's ViT (no image_encoder.patch_embed.proj.weight "
                              "or image_encoder.blocks.N keys; MobileSAM / EfficientSAM encoders are not supported)")
    if shape == (kind.embed_dim, kind.depth):
        return
    match = next((t.name for t in SAM_TYPES.values() if (t.embed_dim, t.depth) == shape), None)
    if match is not None:
        raise CheckpointError(f"{path} holds a {match} SAM checkpoint, --sam {kind.name} given")
    raise CheckpointError(f"{path} holds a SAM image encoder of width {shape[0]} and depth {shape[1]}, which is none of "
                          + ", ".join(f"{t.name} ({t.embed_dim}, {t.depth})" for t in SAM_TYPES.values())
                          + f"; --sam {kind.name} given")


def load_sam(name: str, weights: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """SAM of type `name` with the weights of the user's file, in eval mode on `device`."""
    require_segment_anything()
    kind = sam_type(name)
    path = Path(weights)
    if not path.exists():
        hint = f" (the official {kind.name} file is {_RELEASE}{kind.official_file})" if kind.official_file else ""
        raise CheckpointError(f"{path}: SAM weights file not found{hint}; dhr never downloads")
    device = torch.device(device)
    sd = load_state_dict(path, prefixes=("module.",), map_location=device)
    _check_type(sd, path, kind)
    model = build_sam(kind.name)
    load_strict(model, sd, where=path)
    return model.to(device).eval()
