"""Model zoo: the CIFAR-style networks of the pruning literature and torchvision's ImageNet models by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODEL_NAMES", "build_model", "resnet_cifar", "vgg16_bn_cifar", "mobilenetv2_cifar"]


class BasicBlock(nn.Module):
    """ResNet basic block with a 1x1 projection shortcut (option B), which keeps channels prunable."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, section 4.2)."""

    def __init__(self, depth: int, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes, stages = width, []
        in_planes = width
        for i in range(3):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
            planes *= 2
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGGCifar(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs, one linear classifier (as in the CIFAR pruning papers)."""

    def __init__(self, num_classes: int = 10, cfg: list | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg or _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int), f"VGG config entries are channel counts or 'M', not {v!r}"
                layers += [nn.Conv2d(in_ch, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, identity skip when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_res = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 for 32x32 inputs: stride 1 in the stem and the first two downsampling stages."""

    # (expand, out channels, repeats, stride); strides adapted to 32x32 as in the CIFAR literature.
    _CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))]
        inp = 32
        for t, c, n, s in self._CFG:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(nn.Sequential(nn.Conv2d(inp, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet_cifar(depth: int) -> Callable[[int], nn.Module]:
    return lambda num_classes: ResNetCifar(depth, num_classes)


def vgg16_bn_cifar(num_classes: int) -> nn.Module:
    return VGGCifar(num_classes)


def mobilenetv2_cifar(num_classes: int) -> nn.Module:
    return MobileNetV2Cifar(num_classes)


_CIFAR_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": resnet_cifar(20),
    "resnet32": resnet_cifar(32),
    "resnet56": resnet_cifar(56),
    "resnet110": resnet_cifar(110),
    "vgg16_bn": vgg16_bn_cifar,
    "mobilenetv2": mobilenetv2_cifar,
}
MODEL_NAMES = tuple(_CIFAR_MODELS) + ("torchvision:<name>", "python:<module>:<callable>")


def _user_model(name: str, num_classes: int) -> nn.Module:
    """`python:<module>:<callable>`: the user's own network, built by a callable importable from the project
    folder (or the environment), given `num_classes=` when it takes that argument."""
    import importlib
    import inspect
    import os
    import sys

    module_name, sep, attr = name.split(":", 1)[1].partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model {name!r}: expected python:<module>:<callable>, e.g. python:mynets:build")
    if os.getcwd() not in sys.path:  # the project folder, where a stage runs: its own modules import as they do for the user
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"model {name!r}: cannot import module {module_name!r} ({e}); allowed: a module in the project folder or installed"
        ) from e
    build = getattr(module, attr, None)
    if not callable(build):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"model {name!r}: module {module_name!r} has no callable {attr!r}; it has: {', '.join(public) or 'none'}")
    takes = inspect.signature(build).parameters
    wants_classes = "num_classes" in takes or any(p.kind is p.VAR_KEYWORD for p in takes.values())
    model = build(num_classes=num_classes) if wants_classes else build()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: {module_name}.{attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build a freshly initialised model by name.

    >>> m = build_model("resnet20", num_classes=10)
    >>> m(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    if name in _CIFAR_MODELS:
        return _CIFAR_MODELS[name](num_classes)
    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.split(":", 1)[1]
        available = torchvision.models.list_models(module=torchvision.models)
        if tv_name not in available:
            raise ValueError(f"unknown torchvision model {tv_name!r}; available: {', '.join(sorted(available))}")
        # weights=None: nothing is downloaded; bring trained weights with model.checkpoint.
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    if name.startswith("python:"):
        return _user_model(name, num_classes)
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
