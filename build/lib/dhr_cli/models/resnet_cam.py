"""ResNet-50/101 CAM network (IRN style): torchvision backbone, layer4 at stride 1 (output stride 16),
a 1x1 conv classifier without bias named `classifier`. CAMs = relu(classifier(layer4));
features = layer3 and layer4. Loads torchvision-named checkpoints, or IRN's res50_cam.pth
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
        # layer4 at stride 1 (IRN strides=(2, 2, 2, 1))
        for m in net.layer4.modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
        self.name = f"resnet{depth}"
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        c3, c4 = self.layer3[-1].conv1.in_channels, net.fc.in_features
        self.classifier = nn.Conv2d(c4, num_classes, 1, bias=False)
        self.classes = list(classes) if classes else [f"class{i}" for i in range(num_classes)]
        self.feature_dims = (c3, c4)

    def extract(self, images: torch.Tensor) -> dict:
        """(B, 3, H, W) -> features [layer3 (B, 1024, h, w), layer4 (B, 2048, h, w)], cams (B, C, h, w) before relu."""
        check_images(images)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        x4 = self.layer4(x3)
        return {"features": [x3, x4], "cams": self.classifier(x4)}

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

