"""The three models' parameters in one framework-neutral layout, and their initial values.

Every framework starts from the arrays made here, once, with numpy from a seed
(:func:`init_params`), and converts them to its own layout; final weights are
converted back (polyopt.consistency.weights_checksum/weights_norms of them
go into the run records). The neutral layout is
Keras's and JAX's:

- dense kernel ``(in, out)``; conv kernel HWIO ``(kh, kw, in, out)``;
- a dense layer that follows a Flatten reads the feature map flattened in
  NHWC order (``flatten_from = (H, W, C)``); torch flattens NCHW, so its
  converter permutes that kernel's rows (see torch_models.py);
- batch norm: ``gamma``, ``beta`` (trainable), ``moving_mean``,
  ``moving_variance`` (state, not trained: :func:`state_layout`).

Parameter names are ``<layer>/<variable>`` (Keras 3's ``variable.path`` for
layers named ``<layer>``); the order of :func:`layout` is the one every
framework uses for optimizer state, gradients and checksums.

Models (the final "softmax" of each is applied in the loss, from logits, in
every framework):

- ``mlp``: Flatten, Dense 128 relu, Dense 10 (MNIST, 101,770 parameters);
- ``cnn``: Conv 32 3x3 relu, MaxPool 2, Conv 64 3x3 relu, MaxPool 2, Flatten,
  Dense 10 (CIFAR-10, the Ranger post's CNN: 42,442 parameters; valid padding);
- ``resnet20``: the CIFAR ResNet v1 of He et al. (2016), 3 stages of 3 basic
  blocks with 16/32/64 filters, option-A shortcuts (stride-2 subsampling and
  zero channel padding: no parameters), global average pooling, Dense 10
  (269,722 parameters). Convolutions have no bias (batch norm follows); 3x3
  convolutions use "same" padding, which for stride 2 on an even input pads
  one row/column at the bottom/right only (TensorFlow's and JAX's rule; torch
  pads explicitly to match).

Batch norm (ResNet-20) is comparable across frameworks: momentum 0.9 (torch's
0.1), eps 1e-5, normalization with the batch's biased variance in training,
moving statistics updated with the biased variance in all three (torch's own
BatchNorm2d would use the unbiased one: torch_models.BatchNorm2d fixes that).

Initial values: Glorot uniform kernels (Keras's default), zero biases, batch
norm gamma 1 and beta 0, moving mean 0 and variance 1.

>>> params = init_params("cnn", seed=0)
>>> sum(p.size for p in params.values())
42442
>>> params["conv1/kernel"].shape, params["dense/kernel"].shape
((3, 3, 3, 32), (2304, 10))
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

MODELS = ("mlp", "cnn", "resnet20")
INPUT_SHAPES = {"mlp": (28, 28, 1), "cnn": (32, 32, 3), "resnet20": (32, 32, 3)}  # HWC
PARAM_COUNTS = {"mlp": 101_770, "cnn": 42_442, "resnet20": 269_722}
NUM_CLASSES = 10
BN_MOMENTUM = 0.9  # Keras's convention: moving = momentum * moving + (1 - momentum) * batch
BN_EPS = 1e-5
RESNET_FILTERS = (16, 32, 64)
RESNET_BLOCKS = 3


class Param(NamedTuple):
    """One array of a model: neutral name, shape and kind (kernel, bias, gamma, ...)."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "dense", "conv", "bias", "gamma", "beta", "moving_mean", "moving_variance"
    flatten_from: tuple[int, int, int] | None = None  # (H, W, C) of a flattened NHWC input


def _dense(layer: str, fan_in: int, units: int, flatten_from=None) -> list[Param]:
    return [Param(f"{layer}/kernel", (fan_in, units), "dense", flatten_from),
            Param(f"{layer}/bias", (units,), "bias")]


def _conv(layer: str, cin: int, cout: int, bias: bool = True) -> list[Param]:
    kernel = [Param(f"{layer}/kernel", (3, 3, cin, cout), "conv")]
    return kernel + ([Param(f"{layer}/bias", (cout,), "bias")] if bias else [])


def _bn(layer: str, channels: int) -> list[Param]:
    return [Param(f"{layer}/gamma", (channels,), "gamma"),
            Param(f"{layer}/beta", (channels,), "beta")]


def resnet_blocks() -> list[tuple[str, int, int, int]]:
    """(block name, input channels, filters, stride) of ResNet-20's nine blocks."""
    blocks, cin = [], RESNET_FILTERS[0]
    for stage, filters in enumerate(RESNET_FILTERS, start=1):
        for block in range(1, RESNET_BLOCKS + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            blocks.append((f"stage{stage}_block{block}", cin, filters, stride))
            cin = filters
    return blocks


def layout(model: str) -> list[Param]:
    """The trainable parameters of ``model``, in the order every framework uses."""
    if model == "mlp":
        return _dense("dense1", 784, 128, flatten_from=(28, 28, 1)) + _dense("dense2", 128, 10)
    if model == "cnn":
        return (_conv("conv1", 3, 32) + _conv("conv2", 32, 64)
                + _dense("dense", 6 * 6 * 64, NUM_CLASSES, flatten_from=(6, 6, 64)))
    if model == "resnet20":
        params = _conv("conv0", 3, RESNET_FILTERS[0], bias=False) + _bn("bn0", RESNET_FILTERS[0])
        for name, cin, filters, _ in resnet_blocks():
            params += _conv(f"{name}_conv1", cin, filters, bias=False) + _bn(f"{name}_bn1", filters)
            params += _conv(f"{name}_conv2", filters, filters, bias=False)
            params += _bn(f"{name}_bn2", filters)
        return params + _dense("dense", RESNET_FILTERS[-1], NUM_CLASSES)
    raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")


def state_layout(model: str) -> list[Param]:
    """The non-trainable state (batch-norm moving statistics) of ``model``."""
    state = []
    for param in layout(model):
        if param.kind == "gamma":
            layer = param.name.rsplit("/", 1)[0]
            state += [Param(f"{layer}/moving_mean", param.shape, "moving_mean"),
                      Param(f"{layer}/moving_variance", param.shape, "moving_variance")]
    return state


def _fans(param: Param) -> tuple[int, int]:
    if param.kind == "conv":
        kh, kw, cin, cout = param.shape
        return kh * kw * cin, kh * kw * cout
    return param.shape[0], param.shape[1]


def init_params(model: str, seed: int = 0, dtype=np.float64) -> dict[str, np.ndarray]:
    """Initial trainable parameters of ``model`` (neutral layout), from ``seed``.

    Drawn in float64 and then cast, so float32 runs start from the rounded
    float64 values.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for param in layout(model):
        if param.kind in ("dense", "conv"):
            fan_in, fan_out = _fans(param)
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            value = rng.uniform(-limit, limit, param.shape)
        elif param.kind == "gamma":
            value = np.ones(param.shape)
        else:
            value = np.zeros(param.shape)
        params[param.name] = value.astype(dtype)
    return params


def init_state(model: str, dtype=np.float64) -> dict[str, np.ndarray]:
    """Initial batch-norm moving statistics (mean 0, variance 1); empty for mlp and cnn."""
    return {p.name: (np.ones if p.kind == "moving_variance" else np.zeros)(p.shape, dtype)
            for p in state_layout(model)}
