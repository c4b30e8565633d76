"""Sparse gradients (TensorFlow's IndexedSlices, JAX's BCOO), side by side with
keras.optimizers on the same sparse gradients.

polyopt densifies a sparse gradient for the rule (duplicate entries summed) and,
where the rule says a zero gradient leaves an element alone (``rule.sparse``),
writes the new values back at the gradient's entries only, as sparse values:
the params (SGD, AdaGrad, RMSprop without momentum, AdaDelta, Adafactor) and
the slots too (AdaGrad). Keras's native optimizers write sparse values to the
same variables; these tests check both the numbers and which variables get
sparse writes. The torch backend has no sparse tensors.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import keras
import numpy as np
import pytest

import polyopt.keras as pk
from tests.test_keras_parity import polyopt_arguments

BACKEND = keras.backend.backend()

SHAPE = (6, 3, 2)
STEPS = 6

#: (native class name, preset, options in Keras's spelling, the variables that get
#: sparse writes: "model" and/or "optimizer", as Keras's own optimizer_sparse_test lists)
CASES = [
    ("SGD", "keras.optimizers.SGD", {"learning_rate": 0.5}, {"model"}),
    ("SGD", "keras.optimizers.SGD", {"momentum": 0.05, "nesterov": True}, set()),
    ("Adagrad", "keras.optimizers.Adagrad", {"learning_rate": 0.1}, {"model", "optimizer"}),
    ("RMSprop", "keras.optimizers.RMSprop", {}, {"model"}),
    ("RMSprop", "keras.optimizers.RMSprop", {"momentum": 0.05, "centered": True}, set()),
    ("Adadelta", "keras.optimizers.Adadelta", {"learning_rate": 1.0}, {"model"}),
    ("Adafactor", "keras.optimizers.Adafactor", {"clip_threshold": 0.5}, {"model"}),
    ("Adam", "keras.optimizers.Adam", {}, set()),
    ("Lion", "keras.optimizers.Lion", {}, set()),
]


def _sparse(values: np.ndarray, rows: list[int], shape=SHAPE):
    """A sparse gradient holding ``values`` at ``rows`` (axis 0) of ``shape``."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.IndexedSlices(tf.constant(values), tf.constant(rows, tf.int64),
                                tf.constant(shape, tf.int64))
    import jax.numpy as jnp
    from jax.experimental import sparse as jax_sparse

    return jax_sparse.BCOO((jnp.asarray(values), jnp.asarray(rows)[:, None]), shape=shape)


def _dense(gradient):
    """The dense tensor a sparse gradient stands for (duplicate entries summed)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(gradient)  # keras.ops keeps IndexedSlices as they are
    return gradient.todense()


@pytest.fixture(autouse=True)
def _jax_without_x64():
    """On JAX, Keras's RMSprop multiplies a BCOO by its float64 learning rate,
    which lax refuses with x64 on (the suite's setting); Keras runs without x64."""
    if BACKEND != "jax":
        yield
        return
    import jax

    with jax.enable_x64(False):
        yield


def _grads(duplicates: bool):
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        rows = sorted(rng.choice(SHAPE[0], size=3, replace=False).tolist())
        if duplicates:
            rows = rows + rows[:2]
        yield _sparse(rng.normal(size=(len(rows), *SHAPE[1:])).astype("float32"), rows)


class _SparseWrites:
    """Spies on an optimizer's assign/assign_add/assign_sub (the values still
    go through) and notes which variables received a sparse value."""

    def __init__(self, optimizer, model_variable):
        self.optimizer, self.model_variable, self.seen = optimizer, model_variable, set()
        self.patches = [mock.patch.object(optimizer, name, side_effect=self._spy(name))
                        for name in ("assign", "assign_add", "assign_sub")]

    def _spy(self, name):
        original = getattr(self.optimizer, name)

        def spy(variable, value):
            if not hasattr(value, "shape") or type(value).__name__ in ("IndexedSlices", "BCOO"):
                target = variable.value if isinstance(variable, keras.Variable) else variable
                if target is self.model_variable.value:
                    self.seen.add("model")
                elif any(target is v.value for v in self.optimizer.variables):
                    self.seen.add("optimizer")
            return original(variable, value)

        return spy

    def __enter__(self):
        for p in self.patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self.patches:
            p.stop()


def _run(optimizer, grads, spy=False):
    variable = keras.Variable(np.ones(SHAPE, "float32"))
    optimizer.build([variable])
    writes = _SparseWrites(optimizer, variable)
    with writes if spy else contextlib.nullcontext():
        for g in grads:
            optimizer.apply([g], [variable])
    return keras.ops.convert_to_numpy(variable), writes.seen


if BACKEND != "torch":  # Keras has no sparse tensors on torch

    @pytest.mark.parametrize("name,preset,options,sparse_writes", CASES,
                             ids=[f"{c[0]}-{'-'.join(c[2]) or 'defaults'}" for c in CASES])
    def test_sparse_gradients_as_keras(name, preset, options, sparse_writes):
        """Same numbers as the native on the same sparse gradients (distinct rows), and
        sparse writes to the same variables as the native's."""
        ours_cls = getattr(pk, name)
        theirs, theirs_writes = _run(getattr(keras.optimizers, name)(**options), _grads(False),
                                     spy=True)
        ours, ours_writes = _run(ours_cls(**polyopt_arguments(ours_cls, preset, options)),
                                 _grads(False), spy=True)
        assert not np.array_equal(ours, np.ones(SHAPE))
        np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=2e-7)
        assert theirs_writes == sparse_writes  # Keras's own test lists these
        assert ours_writes == sparse_writes

    @pytest.mark.parametrize("name,preset,options,sparse_writes", CASES,
                             ids=[f"{c[0]}-{'-'.join(c[2]) or 'defaults'}" for c in CASES])
    def test_duplicate_entries_are_summed_first(name, preset, options, sparse_writes):
        """A sparse gradient that names a row twice is the dense gradient with the two
        slices summed: polyopt gives the native's numbers on that dense gradient."""
        ours_cls = getattr(pk, name)
        dense = [_dense(g) for g in _grads(True)]
        theirs, _ = _run(getattr(keras.optimizers, name)(**options), dense)
        ours, _ = _run(ours_cls(**polyopt_arguments(ours_cls, preset, options)), _grads(True))
        np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=2e-7)


if BACKEND == "tensorflow":

    def test_tensorflow_native_applies_duplicate_slices_one_by_one():
        """Why polyopt keeps summing first: Keras's Adagrad on TensorFlow adds the
        square of each duplicate slice (g1**2 + g2**2, not (g1 + g2)**2), so its
        numbers on a sparse gradient differ from its numbers on the same gradient dense."""
        sparse, _ = _run(keras.optimizers.Adagrad(learning_rate=0.1), _grads(True))
        dense, _ = _run(keras.optimizers.Adagrad(learning_rate=0.1),
                        [_dense(g) for g in _grads(True)])
        assert np.max(np.abs(sparse - dense)) > 1e-3

    @pytest.mark.parametrize("name", ["SGD", "Adagrad"])
    def test_embedding_fit_as_keras(name):
        """model.fit with an Embedding (IndexedSlices gradients, rows repeated within a
        batch) as the native; SGD and AdaGrad write the rows the batch saw only."""
        rng = np.random.default_rng(0)
        x = np.stack([rng.choice(20, size=4, replace=False) for _ in range(10)])  # distinct rows
        y = rng.normal(size=(10, 1)).astype(np.float32)
        weights = []
        for optimizer in (getattr(keras.optimizers, name)(learning_rate=0.1),
                          getattr(pk, name)(**polyopt_arguments(
                              getattr(pk, name), f"keras.optimizers.{name}",
                              {"learning_rate": 0.1}))):
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((4,), dtype="int32"),
                                      keras.layers.Embedding(20, 3), keras.layers.Flatten(),
                                      keras.layers.Dense(1)])
            model.compile(optimizer=optimizer, loss="mse")
            model.fit(x, y, batch_size=1, epochs=2, shuffle=False, verbose=0)
            weights.append(model.get_weights())
        for theirs, ours in zip(*weights):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
