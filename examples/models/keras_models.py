"""The three models in Keras 3 (functional API, NHWC), on the neutral layout of init.py.

Keras's layouts are the neutral ones (dense ``(in, out)``, conv HWIO, NHWC
flatten), so weights are assigned as they are; layers are named after the
neutral ``<layer>`` so that ``variable.path`` is the neutral name. Works on
every Keras backend (the matrix uses TensorFlow); the final softmax is in the
loss (``from_logits=True``).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from examples.models import init


@keras.saving.register_keras_serializable(package="polyopt_examples")
class Shortcut(layers.Layer):
    """ResNet option-A shortcut: subsample by ``stride``, zero-pad ``pad`` channels each side."""

    def __init__(self, stride: int, pad: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stride, self.pad = stride, pad

    def call(self, x):
        s = self.stride
        return ops.pad(x[:, ::s, ::s, :], [[0, 0], [0, 0], [0, 0], [self.pad, self.pad]])

    def compute_output_shape(self, shape):
        def sub(n):
            return None if n is None else -(-n // self.stride)
        return (shape[0], sub(shape[1]), sub(shape[2]), shape[3] + 2 * self.pad)

    def get_config(self):
        return {**super().get_config(), "stride": self.stride, "pad": self.pad}


def _mlp(x, dtype):
    x = layers.Flatten(dtype=dtype)(x)
    x = layers.Dense(128, activation="relu", name="dense1", dtype=dtype)(x)
    return layers.Dense(init.NUM_CLASSES, name="dense2", dtype=dtype)(x)


def _cnn(x, dtype):
    x = layers.Conv2D(32, 3, activation="relu", name="conv1", dtype=dtype)(x)
    x = layers.MaxPooling2D(2, dtype=dtype)(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2", dtype=dtype)(x)
    x = layers.MaxPooling2D(2, dtype=dtype)(x)
    x = layers.Flatten(dtype=dtype)(x)
    return layers.Dense(init.NUM_CLASSES, name="dense", dtype=dtype)(x)


def _resnet20(x, dtype):
    def conv(name, filters, stride=1):
        return layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                             name=name, dtype=dtype)

    def bn(name):
        return layers.BatchNormalization(momentum=init.BN_MOMENTUM, epsilon=init.BN_EPS,
                                         name=name, dtype=dtype)

    x = layers.ReLU(dtype=dtype)(bn("bn0")(conv("conv0", init.RESNET_FILTERS[0])(x)))
    for name, cin, filters, stride in init.resnet_blocks():
        out = conv(f"{name}_conv1", filters, stride)(x)
        out = layers.ReLU(dtype=dtype)(bn(f"{name}_bn1")(out))
        out = bn(f"{name}_bn2")(conv(f"{name}_conv2", filters)(out))
        pad = (filters - cin) // 2
        shortcut = Shortcut(stride, pad, dtype=dtype)(x) if stride != 1 or pad else x
        x = layers.ReLU(dtype=dtype)(layers.Add(dtype=dtype)([out, shortcut]))
    x = layers.GlobalAveragePooling2D(dtype=dtype)(x)
    return layers.Dense(init.NUM_CLASSES, name="dense", dtype=dtype)(x)


BODIES = {"mlp": _mlp, "cnn": _cnn, "resnet20": _resnet20}


def _variable(model: keras.Model, name: str):
    layer, variable = name.rsplit("/", 1)
    return getattr(model.get_layer(layer), variable)


def parameters(model: keras.Model, name: str) -> list:
    """The trainable variables of ``model`` (of kind ``name``) in init.layout order."""
    return [_variable(model, p.name) for p in init.layout(name)]


def load_neutral(model: keras.Model, name: str, params: dict[str, np.ndarray],
                 state: dict[str, np.ndarray] | None = None) -> keras.Model:
    """Assign neutral-layout ``params`` (and batch-norm ``state``) to ``model``."""
    values = {**params, **(state or {})}
    for param in init.layout(name) + (init.state_layout(name) if state else []):
        variable = _variable(model, param.name)
        if tuple(variable.shape) != values[param.name].shape:
            raise ValueError(f"{param.name}: Keras shape {tuple(variable.shape)}, "
                             f"given {values[param.name].shape}")
        variable.assign(values[param.name])
    return model


def to_neutral(model: keras.Model, name: str, state: bool = False) -> dict[str, np.ndarray]:
    """The weights of ``model`` in the neutral layout (the batch-norm state if ``state``)."""
    layout = init.state_layout(name) if state else init.layout(name)
    return {p.name: np.asarray(ops.convert_to_numpy(_variable(model, p.name))) for p in layout}


def build(name: str, seed: int = 0, dtype: str = "float32") -> keras.Model:
    """Model ``name`` in ``dtype``, with the initial weights of init.init_params(seed)."""
    inputs = keras.Input(init.INPUT_SHAPES[name], dtype=dtype)
    model = keras.Model(inputs, BODIES[name](inputs, dtype), name=name)
    return load_neutral(model, name, init.init_params(name, seed, np.dtype(dtype)),
                        init.init_state(name, np.dtype(dtype)))


def loss_fn(dtype: str = "float32") -> keras.losses.Loss:
    """Mean softmax cross-entropy from logits (integer labels)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)
