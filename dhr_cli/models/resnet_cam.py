"""ResNet-50/101 CAM network (IRN style): torchvision backbone, layer4 at stride 1 (output stride 16),
a 1x1 conv classifier without bias named `classifier`. CAMs = relu(classifier(layer4));
features = layer3 and layer4 (`configure_features`: any of layer1..layer4, L2-normalised each, on the
finest chosen grid; output stride 8 with layer3 at stride 1 too, or 32 as torchvision). Loads torchvision-named checkpoints, or IRN's res50_cam.pth
(stage1 = conv1, bn1, relu, maxpool, layer1; stage2..4 = layer2..4), strictly."""

from __future__ import annotations

import torch
from torch import nn

from dhr_cli.errors import CheckpointError
from dhr_cli.models.base import FeatureSource, check_images
from dhr_cli.models.checkpoints import load_state_dict, load_strict

# IRN's resnet50_cam.Net wraps torchvision-style modules: stage1 = Sequential(conv1, bn1, relu,
# maxpool, layer1), stage2..4 = Sequential(layerN); backbone / newly_added are ModuleLists of the
# same modules. Its saved state dict therefore holds every tensor several times.
_IRN = {"stage1.0.": "conv1.", "stage1.1.": "bn1.", "stage1.4.": "layer1.", "stage2.0.": "layer2.",
        "stage3.0.": "layer3.", "stage4.0.": "layer4."}  # fmt: skip


def irn_to_torchvision(sd: dict) -> dict:
    """IRN's res50_cam.pth (model.module.state_dict()) -> torchvision names + classifier.weight.

    The file has the backbone under `resnet50.*` and again under `stage*` / `backbone.*`, the head
    under `classifier.weight` and `newly_added.0.weight`: one copy of each is kept. Files that hold
    only the `stage*` names are renamed; torchvision-named files pass through unchanged.
    """
    if any(k.startswith("resnet50.") for k in sd):
        out = {k[len("resnet50."):]: v for k, v in sd.items() if k.startswith("resnet50.") and ".fc." not in f".{k}"}
        out = {k: v for k, v in out.items() if not k.startswith("fc.")}
        if "classifier.weight" in sd:
            out["classifier.weight"] = sd["classifier.weight"]
        return out
    out = {}
    for k, v in sd.items():
        if k.startswith(("backbone.", "newly_added.")):
            continue
        for a, b in _IRN.items():
            if k.startswith(a):
                k = b + k[len(a):]
                break
        out[k] = v
    return out


def infer_depth(sd: dict, where="checkpoint") -> int:
    """ResNet depth from a torchvision-named state dict (blocks in layer3, bottleneck or basic)."""
    n3 = len({k.split(".")[1] for k in sd if k.startswith("layer3.")})
    bottleneck = "layer1.0.conv3.weight" in sd
    depth = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101}.get((n3, bottleneck))
    if depth is None:
        raise CheckpointError(f"{where}: not a ResNet-18/34/50/101 state dict ({n3} layer3 blocks)")
    return depth


class ResNetCAM(FeatureSource):
    """torchvision ResNet + `classifier` (Conv1x1, no bias). Input ImageNet-normalised."""

    kind = "wss"
    stride = 16
    multiple = 1
    base_side = None
    layer_names = ("layer1", "layer2", "layer3", "layer4")
    strides = (8, 16, 32)

    def __init__(self, depth: int = 50, num_classes: int = 20, classes: list[str] | None = None,
                 width: int = 64):
        super().__init__()
        import torchvision

        ctors = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50,
                 101: torchvision.models.resnet101}
        if depth not in ctors:
            raise CheckpointError(f"ResNet depth {depth}: expected 18, 34, 50 or 101")
        ctor = ctors[depth]
        net = ctor(weights=None)
        # The stride-2 convs of layer3 and layer4 (first block: conv2 and the downsample conv),
        # switched by `configure_features`; layer4 at stride 1 by default (IRN strides=(2, 2, 2, 1)).
        self._down = {name: [m for m in getattr(net, name).modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
                      for name in ("layer3", "layer4")}
        self._set_stride(16)
        self.name = f"resnet{depth}"
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        c3, c4 = self.layer3[-1].conv1.in_channels, net.fc.in_features
        self.classifier = nn.Conv2d(c4, num_classes, 1, bias=False)
        self.classes = list(classes) if classes else [f"class{i}" for i in range(num_classes)]
        self._dims = {"layer1": self.layer2[0].conv1.in_channels, "layer2": self.layer3[0].conv1.in_channels,
                      "layer3": c3, "layer4": c4}
        self.feature_dims = (c3, c4)
        self.feature_layers = ("layer3", "layer4")

    def _set_stride(self, stride: int) -> None:
        for name, on in (("layer3", stride >= 16), ("layer4", stride >= 32)):
            for m in self._down[name]:
                m.stride = (2, 2) if on else (1, 1)
        self.stride = stride

    def configure_features(self, layers=(), stride: int | None = None) -> None:
        """Feature maps from `layers` (layer1..layer4, L2-normalised each) and/or output stride 8, 16 or 32."""
        names = self._check_layers(layers)
        self._set_stride(self._check_stride(stride))
        self.feature_layers = tuple(names) or ("layer3", "layer4")
        self.feature_dims = tuple(self._dims[n] for n in self.feature_layers)
        self.layer_norm = bool(names)

    def extract(self, images: torch.Tensor) -> dict:
        """(B, 3, H, W) -> features [one (B, D_l, h_l, w_l) per layer; default layer3, layer4], cams (B, C, h, w)
        of layer4 before relu."""
        check_images(images)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outs = {"layer1": self.layer1(x)}
        outs["layer2"] = self.layer2(outs["layer1"])
        outs["layer3"] = self.layer3(outs["layer2"])
        outs["layer4"] = self.layer4(outs["layer3"])
        return {"features": [outs[n] for n in self.feature_layers], "cams": self.classifier(outs["layer4"])}

    @classmethod
    def from_checkpoint(cls, name: str | None, path, classes: list[str] | None = None, trust: bool = False) -> "ResNetCAM":
        """`name` "resnet50" / "resnet101" / ... pins the depth; None reads it from the weights."""
        sd = irn_to_torchvision(load_state_dict(path, trust))
        depth = int(name.replace("resnet", "")) if name else infer_depth(sd, path)
        w = sd.get("classifier.weight")
        if w is None:
            raise CheckpointError(f"{path}: no classifier.weight (a CAM checkpoint needs the 1x1 classifier)")
        if classes is not None and len(classes) != w.shape[0]:
            raise CheckpointError(f"{path}: classifier has {w.shape[0]} classes but the dataset has {len(classes)} foreground classes")
        net = cls(depth, w.shape[0], classes)
        load_strict(net, sd, path)
        return net

