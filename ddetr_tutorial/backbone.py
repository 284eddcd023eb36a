"""The CNN backbone: a ResNet giving multi-scale feature maps C3, C4, C5 (paper Appendix A.2).

The encoder's input maps "are extracted from the output feature maps of stages
C3 through C5 in ResNet" (strides 8, 16, 32) of an ImageNet ResNet-50; the model
adds a fourth, stride-64 level on top of C5 itself. torchvision cannot be
imported next to the CPU torch build here, so the ResNet is written out below
with torchvision's module names: a torchvision ImageNet state dict, and the
`backbone.0.body.*` part of an official checkpoint, load unchanged.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .position_encoding import build_position_encoding
from .shipped import SHIPPED_BACKBONES, resolve_backbone_weights


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms: y = (x - mean) / sqrt(var + eps) * w + b.

    All four are buffers, so an optimizer never sees them and there is no
    `num_batches_tracked` (official checkpoints have none). Detection batches of
    2 images are too small for batch statistics, hence frozen ImageNet ones.
    """

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision's BatchNorm2d saves a step counter that means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps H, W (divided by the stride) for any dilation.
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs plus the shortcut; (N, C_in, H, W) -> (N, C, H/s, W/s)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride, dilation)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101 block: 1x1 reduce, 3x3, 1x1 expand (x4) plus the shortcut.

    The stride sits on the 3x3 conv (torchvision's "ResNet v1.5"), as in the
    ImageNet weights the official model starts from.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = FrozenBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet body without avgpool/fc: images (N, 3, H, W) -> [C2, C3, C4, C5].

    C2..C5 have strides 4, 8, 16, 32 (each map is ceil(H / stride) x ceil(W / stride))
    and widths 64, 128, 256, 512 times `block.expansion`. With `dilation`, layer4
    keeps stride 16 and dilates its 3x3 convs by 2 instead ("DC5"). `width` scales
    the channels (64 is torchvision's; 32 gives a quarter of the weights and
    FLOPs, for small models trained from scratch).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 dilation: bool = False, width: int = 64):
        super().__init__()
        if not isinstance(width, int) or width < 8:
            raise ValueError(f"width must be an int >= 8, got {width!r}")
        planes = [width, 2 * width, 4 * width, 8 * width]
        self.in_ch, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2, dilate=dilation)
        self.num_channels = [c * block.expansion for c in planes]
        self._init_weights()

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        # As torchvision: a dilated stage trades its stride for dilation; its first
        # block keeps the previous dilation, the later ones use the new one.
        first_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_ch != out_ch:
            downsample = nn.Sequential(conv1x1(self.in_ch, out_ch, stride),
                                       FrozenBatchNorm2d(out_ch))
        layers = [block(self.in_ch, planes, stride, first_dilation, downsample)]
        self.in_ch = out_ch
        layers += [block(out_ch, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self):
        # torchvision's init; it matters only when no pretrained weights are loaded.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(images)))
        if x.device.type == "cpu":
            # PyTorch's CPU max-pool is several times faster on channels-last memory than
            # on NCHW (same values); the convolutions after it are faster on NCHW.
            x = self.maxpool(x.contiguous(memory_format=torch.channels_last)).contiguous()
        else:
            x = self.maxpool(x)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def resnet(name: str, dilation: bool = False, width: int = 64) -> ResNet:
    """A randomly initialized ResNet body by torchvision name ('resnet18', ..., 'resnet101')."""
    if name not in RESNETS:
        raise ValueError(f"unknown backbone {name!r}, expected one of {sorted(RESNETS)}")
    block, layers = RESNETS[name]
    return ResNet(block, layers, dilation=dilation, width=width)


def load_resnet_weights(body: ResNet, path: str | os.PathLike) -> None:
    """Load a torchvision-format ResNet state dict from the local file `path` (or a
    shipped name, `shipped.SHIPPED_BACKBONES`) into `body`.

    `fc.*` (the ImageNet classifier) and `num_batches_tracked` are dropped; any
    other missing, unexpected or mis-shaped key is an error that lists them.
    """
    path = resolve_backbone_weights(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained backbone weights not found: {os.fspath(path)!r} "
                                f"(a local torchvision-format ResNet state dict, or a shipped "
                                f"name: {', '.join(SHIPPED_BACKBONES)}; nothing is downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"{os.fspath(path)!r} holds a {type(state).__name__}, "
                        f"expected a state dict (dict of tensors)")
    state = {k: v for k, v in state.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    expected = body.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mis_shaped:
        raise ValueError(f"{os.fspath(path)!r} does not fit this ResNet: "
                         f"missing keys {_short(missing)}, unexpected keys {_short(unexpected)}, "
                         f"shape mismatches {_short(mis_shaped)}")
    body.load_state_dict(state, strict=True)


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return f"[{shown}{more}]"


class Backbone(nn.Module):
    """A ResNet whose intermediate maps become the detector's input levels.

    Returns C3, C4, C5 (strides 8, 16, 32; DC5: 8, 16, 16) when
    `return_interm_layers`, else C5 only, each with the padding mask resized to it;
    `levels` (indices into [C2..C5]) picks others, e.g. [0, 1, 2, 3] for an FPN.
    As the official model, conv1 and layer1 never train, and nothing trains when
    `train_backbone` is False. `pretrained`: a local torchvision-format state dict
    or a shipped name ("shapes_resnet18_w32", pretrained in `pretraining.py`).

    For a backbone trained from scratch (no ImageNet weights, as the `tiny`
    config on shapes), `train_stem=True` trains conv1 and layer1 too and
    `norm="batch"` uses trainable BatchNorm2d: frozen identity statistics and
    frozen random filters would otherwise stay as they were initialised.
    """

    def __init__(self, name: str = "resnet50", train_backbone: bool = True,
                 return_interm_layers: bool = True, dilation: bool = False,
                 pretrained: str | os.PathLike | None = None, norm: str = "frozen",
                 train_stem: bool = False, width: int = 64, levels=None):
        super().__init__()
        if norm not in ("frozen", "batch"):
            raise ValueError(f"norm must be 'frozen' or 'batch', got {norm!r}")
        self.body = resnet(name, dilation=dilation, width=width)
        if pretrained is not None:
            load_resnet_weights(self.body, pretrained)
        if norm == "batch":
            unfreeze_batch_norm(self.body)
        trained = (("layer2", "layer3", "layer4")
                   + (("conv1", "bn1", "layer1") if train_stem else ()))
        for pname, param in self.body.named_parameters():
            # The stem and layer1 stay at their ImageNet values (low-level filters).
            param.requires_grad_(train_backbone and pname.startswith(trained))
        if levels is None:  # indices into [C2..C5]
            levels = [1, 2, 3] if return_interm_layers else [3]
        if not levels or any(lvl not in (0, 1, 2, 3) for lvl in levels):
            raise ValueError(f"levels must be indices into [C2, C3, C4, C5] (0-3), got {levels!r}")
        self.levels = list(levels)
        strides = [4, 8, 16, 16 if dilation else 32]
        self.strides = [strides[i] for i in self.levels]
        self.num_channels = [self.body.num_channels[i] for i in self.levels]

    def forward(self, images: torch.Tensor, mask: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """images: (N, 3, H, W); mask: (N, H, W) bool, True on padding.

        Returns features [(N, C_l, H_l, W_l)] and masks [(N, H_l, W_l)], one per level.
        """
        check_images_and_mask(images, mask)
        maps = self.body(images)
        features = [maps[i] for i in self.levels]
        masks = [resize_mask(mask, f.shape[-2:]) for f in features]
        return features, masks


def unfreeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every FrozenBatchNorm2d in `module` by a trainable BatchNorm2d with the
    same statistics and affine terms (state-dict keys stay the same, plus
    `num_batches_tracked`)."""
    for name, child in module.named_children():
        if isinstance(child, FrozenBatchNorm2d):
            bn = nn.BatchNorm2d(child.weight.shape[0], eps=child.eps)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, key).copy_(getattr(child, key))
            setattr(module, name, bn)
        else:
            unfreeze_batch_norm(child)
    return module


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """(N, H, W) bool -> (N, h, w) bool, nearest neighbour as the official code."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def check_images_and_mask(images: torch.Tensor, mask: torch.Tensor) -> None:
    """images (N, 3, H, W) and a bool mask (N, H, W), or a ValueError / TypeError saying why."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True on padding), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    N, _, H, W = images.shape
    if tuple(mask.shape) != (N, H, W):
        raise ValueError(f"mask must be (N, H, W) = ({N}, {H}, {W}) to match images, "
                         f"got {tuple(mask.shape)}")


class Joiner(nn.Sequential):
    """Backbone plus position encoding; as a Sequential they are `backbone.0` and
    `backbone.1` inside the detector, the official key layout.
    """

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """images: (N, 3, H, W); mask: (N, H, W) bool, True on padding.

        Returns (features, masks, positions), lists over levels of
        (N, C_l, H_l, W_l), (N, H_l, W_l) and (N, 2F, H_l, W_l) in the features' dtype.
        """
        features, masks = self[0](images, mask)
        positions = [self[1](m).to(f.dtype) for f, m in zip(features, masks)]
        return features, masks, positions


def build_backbone(*, name: str = "resnet50", hidden_dim: int = 256, train_backbone: bool = True,
                   return_interm_layers: bool = True, dilation: bool = False,
                   pretrained: str | os.PathLike | None = None, norm: str = "frozen",
                   train_stem: bool = False, width: int = 64,
                   position_offset: float = 0.5, levels=None) -> Joiner:
    """Backbone + sine position encoding of width hidden_dim (C), as the detector uses them
    (position_offset: 0.5 in Deformable DETR, 0 in DETR; see PositionEmbeddingSine)."""
    backbone = Backbone(name, train_backbone=train_backbone,
                        return_interm_layers=return_interm_layers, dilation=dilation,
                        pretrained=pretrained, norm=norm, train_stem=train_stem, width=width,
                        levels=levels)
    return Joiner(backbone, build_position_encoding(hidden_dim=hidden_dim,
                                                    offset=position_offset))


__all__ = ["FrozenBatchNorm2d", "unfreeze_batch_norm", "BasicBlock", "Bottleneck", "ResNet",
           "resnet", "load_resnet_weights", "Backbone", "Joiner", "build_backbone", "resize_mask"]
