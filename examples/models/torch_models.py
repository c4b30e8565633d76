"""The three models in torch.nn (NCHW), loaded from the neutral layout of init.py.

Conversions (``load_neutral`` / ``to_neutral``):

- dense kernel ``(in, out)`` -> ``Linear.weight`` ``(out, in)``;
- conv kernel HWIO -> ``Conv2d.weight`` OIHW;
- the dense after a Flatten: the neutral kernel reads an NHWC-flattened map,
  torch flattens NCHW, so the rows are permuted from (h, w, c) to (c, h, w)
  order; the forward pass is then identical (tests/test_models.py);
- batch norm gamma/beta -> weight/bias, moving mean/variance -> running_mean/var.

Inputs are NCHW (``to_input`` converts the NHWC uint8 batches of examples.data).
Stride-2 "same" convolutions pad (top 0, bottom 1, left 0, right 1) like
TensorFlow and JAX, where ``padding=1`` would pad both sides.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples.models import init

TORCH_NAMES = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
               "moving_mean": "running_mean", "moving_variance": "running_var"}


class BatchNorm2d(nn.BatchNorm2d):
    """torch's BatchNorm2d, except that training updates the running variance with the
    batch's biased variance (as Keras and JAX do) instead of the unbiased one.

    Normalization is unchanged (biased batch variance in training, running
    statistics in eval); ``momentum`` is torch's (new-value weight).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        out = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        with torch.no_grad():
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var, alpha=self.momentum)
            self.num_batches_tracked.add_(1)
        return out


def _batch_norm(channels: int) -> BatchNorm2d:
    return BatchNorm2d(channels, eps=init.BN_EPS, momentum=1 - init.BN_MOMENTUM)


def _conv3x3(cin: int, cout: int, stride: int = 1, padding: str = "same",
             bias: bool = True) -> nn.Module:
    if padding == "valid":
        return nn.Conv2d(cin, cout, 3, bias=bias)
    if stride == 1:
        return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    return nn.Sequential(OrderedDict(pad=nn.ZeroPad2d((0, 1, 0, 1)),
                                     conv=nn.Conv2d(cin, cout, 3, stride=stride, bias=bias)))


def _conv_of(module: nn.Module) -> nn.Module:
    return module.conv if isinstance(module, nn.Sequential) else module


class MLP(nn.Module):
    """Flatten, Dense 128 relu, Dense 10 (logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense1 = nn.Linear(784, 128)
        self.dense2 = nn.Linear(128, init.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.relu(self.dense1(torch.flatten(x, 1))))


class CNN(nn.Module):
    """Conv 32 3x3 relu, MaxPool 2, Conv 64 3x3 relu, MaxPool 2, Flatten, Dense 10 (logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.dense = nn.Linear(6 * 6 * 64, init.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.dense(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the option-A shortcut, then relu."""

    def __init__(self, cin: int, filters: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, filters, stride, bias=False)
        self.bn1 = _batch_norm(filters)
        self.conv2 = _conv3x3(filters, filters, bias=False)
        self.bn2 = _batch_norm(filters)
        self.stride, self.pad = stride, (filters - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride],
                             (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 v1 (He et al. 2016), option-A shortcuts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = _conv3x3(3, init.RESNET_FILTERS[0], bias=False)
        self.bn0 = _batch_norm(init.RESNET_FILTERS[0])
        stages: dict[str, OrderedDict] = {}
        for name, cin, filters, stride in init.resnet_blocks():
            stage, block = name.split("_")
            stages.setdefault(stage, OrderedDict())[block] = BasicBlock(cin, filters, stride)
        for stage, blocks in stages.items():
            self.add_module(stage, nn.Sequential(blocks))
        self.dense = nn.Linear(init.RESNET_FILTERS[-1], init.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.conv0(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.dense(x.mean(dim=(2, 3)))


CLASSES = {"mlp": MLP, "cnn": CNN, "resnet20": ResNet20}


def _tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    layer, variable = name.rsplit("/", 1)
    module = _conv_of(model.get_submodule(layer.replace("_", ".")))
    return getattr(module, TORCH_NAMES[variable])


def _to_torch(param: init.Param, value: np.ndarray) -> np.ndarray:
    if param.kind == "conv":
        return value.transpose(3, 2, 0, 1)
    if param.kind == "dense":
        if param.flatten_from is not None:
            h, w, c = param.flatten_from
            value = value.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
        return value.T
    return value


def _from_torch(param: init.Param, value: np.ndarray) -> np.ndarray:
    if param.kind == "conv":
        return value.transpose(2, 3, 1, 0)
    if param.kind == "dense":
        value = value.T
        if param.flatten_from is not None:
            h, w, c = param.flatten_from
            value = value.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
    return value


def parameters(model: nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The trainable parameters of ``model`` (of kind ``name``) in init.layout order."""
    return [_tensor_of(model, p.name) for p in init.layout(name)]


def load_neutral(model: nn.Module, name: str, params: dict[str, np.ndarray],
                 state: dict[str, np.ndarray] | None = None) -> nn.Module:
    """Copy neutral-layout ``params`` (and batch-norm ``state``) into ``model``."""
    layout = init.layout(name) + (init.state_layout(name) if state else [])
    values = {**params, **(state or {})}
    with torch.no_grad():
        for param in layout:
            tensor = _tensor_of(model, param.name)
            converted = np.ascontiguousarray(_to_torch(param, values[param.name]))
            if tuple(tensor.shape) != converted.shape:
                raise ValueError(f"{param.name}: torch shape {tuple(tensor.shape)}, "
                                 f"converted {converted.shape}")
            tensor.copy_(torch.from_numpy(converted))
    return model


def to_neutral(model: nn.Module, name: str, state: bool = False) -> dict[str, np.ndarray]:
    """The weights of ``model`` in the neutral layout (the batch-norm state if ``state``)."""
    layout = init.state_layout(name) if state else init.layout(name)
    return {p.name: np.ascontiguousarray(
        _from_torch(p, _tensor_of(model, p.name).detach().cpu().numpy())) for p in layout}


def build(name: str, seed: int = 0, dtype: str = "float32") -> nn.Module:
    """Model ``name`` in ``dtype``, with the initial weights of init.init_params(seed)."""
    model = CLASSES[name]().to(getattr(torch, dtype))
    return load_neutral(model, name, init.init_params(name, seed, np.dtype(dtype)),
                        init.init_state(name, np.dtype(dtype)))


def to_input(images: np.ndarray) -> torch.Tensor:
    """NHWC numpy batch -> NCHW torch tensor (same dtype)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy from logits."""
    return F.cross_entropy(logits, labels)


def gradients(model: nn.Module, name: str) -> dict[str, np.ndarray]:
    """The ``.grad`` of every trainable parameter, converted to the neutral layout."""
    return {p.name: np.ascontiguousarray(
        _from_torch(p, _tensor_of(model, p.name).grad.detach().cpu().numpy()))
        for p in init.layout(name)}
