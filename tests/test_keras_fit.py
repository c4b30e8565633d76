"""polyopt.keras in Keras' own machinery: compile/fit, saving, callbacks, base-class options."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import polyopt.keras as pk
from polyopt import hyper, native, schedules
from tests._mnist import mnist
from tests.test_keras_parity import polyopt_arguments, side_by_side

BACKEND = keras.backend.backend()
ADAM_KERAS = polyopt_arguments(pk.Adam, "keras.optimizers.Adam", {})


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    w = rng.normal(size=(6, 2)).astype(np.float32)
    return x, (np.tanh(x @ w) + 0.1 * rng.normal(size=(n, 2))).astype(np.float32)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(2)])
    return model


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _fit(optimizer, epochs=2, callbacks=(), jit_compile="auto", model=None, **kw):
    x, y = _data()
    model = model or _model()
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0,
                        callbacks=list(callbacks), **kw)
    return model, history


OPTIMIZERS = {
    "SGD": lambda: pk.SGD(learning_rate=0.1, momentum=0.9, nesterov=True),
    "Adagrad": lambda: pk.Adagrad(learning_rate=0.1),
    "RMSprop": lambda: pk.RMSprop(centered=True, momentum=0.5),
    "Adadelta": lambda: pk.Adadelta(),
    "Adam": lambda: pk.Adam(learning_rate=0.01, amsgrad=True),
    "AdamW": lambda: pk.AdamW(learning_rate=0.01),
    "Adamax": lambda: pk.Adamax(),
    "Nadam": lambda: pk.Nadam(),
    "RAdam": lambda: pk.RAdam(learning_rate=0.01),
    "Lookahead": lambda: pk.Lookahead(pk.RAdam(learning_rate=0.01), sync_period=6,
                                      slow_step_size=0.5),
    "Ranger": lambda: pk.Ranger(learning_rate=0.01),
    "Muon": lambda: pk.Muon(learning_rate=0.01, adam_learning_rate=None, adam_lr_ratio=0.5,
                            exclude_layers=["bias"], exclude_embeddings=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fit_lowers_the_loss(name):
    """jit_compile='auto': XLA on TensorFlow, jax.jit on JAX, eager torch."""
    model, history = _fit(OPTIMIZERS[name](), epochs=3)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3 * 8


@pytest.mark.parametrize("name", ["Adam", "Ranger", "Muon"])
def test_fit_with_jit_compile_true(name):
    """jit_compile=True on every backend (torch: torch.compile, slow: two optimizers only)."""
    model, history = _fit(OPTIMIZERS[name](), epochs=2, jit_compile=True)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ["Adam", "Lookahead", "Ranger", "Nadam", "Muon"])
def test_save_load_resumes_exactly(name, tmp_path):
    x, y = _data()
    full, _ = _fit(OPTIMIZERS[name](), epochs=2)
    first, _ = _fit(OPTIMIZERS[name](), epochs=1)
    path = tmp_path / "model.keras"
    first.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(first.optimizer)
    assert loaded.optimizer.get_config() == first.optimizer.get_config()
    for a, b in zip(loaded.optimizer.variables, first.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    loaded.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(_weights(loaded), _weights(full)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_loading_mismatched_optimizer_state_is_a_clear_error(tmp_path):
    x, y = _data()
    model, _ = _fit(pk.SGD(momentum=0.9), epochs=1)
    path = tmp_path / "model.keras"
    model.save(path)
    other = _model()
    other.compile(optimizer=pk.SGD(), loss="mse")
    other.fit(x[:32], y[:32], verbose=0)
    with pytest.raises(ValueError, match=r"saved optimizer state holds 6 variables but this "
                                         r"optimizer \(sgd with momentum=0.0.*\) has 2"):
        other.load_weights(path)


def test_load_own_variables_checks_shapes():
    opt = pk.Adam()
    opt.build([keras.Variable(np.zeros((2, 3), np.float32))])
    store = {str(i): keras.ops.convert_to_numpy(v) for i, v in enumerate(opt.variables)}
    store["2"] = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"saved optimizer variable 2 has shape \(3, 2\)"):
        opt.load_own_variables(store)


def _native_and_ours_fit(callbacks_factory, epochs, **fit_kw):
    ours, h1 = _fit(pk.Adam(learning_rate=0.05, **{k: v for k, v in ADAM_KERAS.items()
                                                     if k != "learning_rate"}),
                    epochs=epochs, callbacks=callbacks_factory(), **fit_kw)
    theirs, h2 = _fit(keras.optimizers.Adam(learning_rate=0.05), epochs=epochs,
                      callbacks=callbacks_factory(), **fit_kw)
    return ours, h1, theirs, h2


def _assert_same_training(ours, h1, theirs, h2):
    for a, b in zip(_weights(ours), _weights(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-4)
    lr1 = float(keras.ops.convert_to_numpy(ours.optimizer.learning_rate))
    lr2 = float(keras.ops.convert_to_numpy(theirs.optimizer.learning_rate))
    assert lr1 == pytest.approx(lr2, rel=1e-6)


def test_reduce_lr_on_plateau_as_with_the_native_optimizer():
    x, y = _data()
    make = lambda: [keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0,  # noqa: E731
                                                       min_delta=1e3)]
    ours, h1, theirs, h2 = _native_and_ours_fit(make, 3)
    _assert_same_training(ours, h1, theirs, h2)
    assert float(keras.ops.convert_to_numpy(ours.optimizer.learning_rate)) == \
        pytest.approx(0.05 * 0.5 ** 2, rel=1e-6)  # epoch 1 sets the best


def test_learning_rate_scheduler_as_with_the_native_optimizer():
    make = lambda: [keras.callbacks.LearningRateScheduler(lambda epoch: 0.05 * 0.3 ** epoch)]  # noqa: E731
    ours, h1, theirs, h2 = _native_and_ours_fit(make, 3)
    _assert_same_training(ours, h1, theirs, h2)
    assert float(keras.ops.convert_to_numpy(ours.optimizer.learning_rate)) == \
        pytest.approx(0.05 * 0.09, rel=1e-6)


def test_early_stopping_restores_best_weights_as_with_the_native_optimizer():
    x, y = _data()
    make = lambda: [keras.callbacks.EarlyStopping(monitor="val_loss", patience=1,  # noqa: E731
                                                  restore_best_weights=True, min_delta=0.05)]
    ours, h1, theirs, h2 = _native_and_ours_fit(make, 8, validation_data=(x[:64], y[:64]))
    assert len(h1.history["loss"]) == len(h2.history["loss"]) < 8
    for a, b in zip(_weights(ours), _weights(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mnist_mlp_one_epoch():
    x, y = mnist("train")
    xt, yt = mnist("test")
    assert x.shape == (8000, 784) and xt.shape == (2000, 784)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile(optimizer=pk.Adam(learning_rate=1e-3), jit_compile="auto",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    _, accuracy = model.evaluate(xt, yt, verbose=0)
    print(f"MNIST {BACKEND} accuracy after 1 epoch: {accuracy:.4f}")
    assert accuracy > 0.85


BASE_CASES = [
    {"clipnorm": 0.5},
    {"clipvalue": 0.1},
    {"global_clipnorm": 0.5},
    {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 5},
    {"gradient_accumulation_steps": 3},
    {"loss_scale_factor": 4.0},
]


@pytest.mark.parametrize("options", BASE_CASES, ids=lambda o: next(iter(o)))
def test_base_class_options_as_with_the_native_optimizer(options):
    ours = pk.Adam(**{**ADAM_KERAS, "learning_rate": 0.01}, **options)
    theirs = keras.optimizers.Adam(learning_rate=0.01, **options)
    gap = side_by_side(ours, theirs, "float32", steps=12)
    assert gap <= 1e-5, gap


# ---------------------------------------------------------------------------
# construction, configuration, learning rates


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_config_round_trip(name):
    opt = OPTIMIZERS[name]()
    config = opt.get_config()
    again = type(opt).from_config(config)
    assert again.get_config() == config
    serialized = keras.optimizers.serialize(opt)
    assert keras.optimizers.deserialize(serialized).get_config() == config


def test_lookahead_config_holds_the_inner_optimizer():
    opt = pk.Lookahead(pk.RAdam(learning_rate=0.02, total_steps=100), sync_period=5,
                       slow_step_size=0.4)
    config = opt.get_config()
    assert config["sync_period"] == 5 and config["slow_step_size"] == 0.4
    assert config["optimizer"]["config"]["total_steps"] == 100
    again = pk.Lookahead.from_config(config)
    assert again.get_config() == config


def test_arguments_are_generated_from_the_spec_with_keras_spellings():
    import inspect

    for cls in (pk.SGD, pk.Adagrad, pk.RMSprop, pk.Adadelta, pk.Adam, pk.AdamW, pk.Adamax,
                pk.Nadam, pk.RAdam, pk.Ranger):
        parameters = inspect.signature(cls).parameters
        for h in cls.spec:
            assert parameters[h.spelling("keras")].default == h.default
        for name, default in pk.BASE_OPTIONS.items():
            assert parameters[name].default == default
    assert "beta_1" in inspect.signature(pk.Adam).parameters
    assert "rho" in inspect.signature(pk.RMSprop).parameters  # the spec's decay


@pytest.mark.parametrize(("cls", "kwargs", "exc", "match"), [
    (pk.Adam, {"beta_1": 1.0}, ValueError, r"adam: beta_1 must be a number in \[0, 1\), "
                                           r"got beta_1=1.0"),
    (pk.RMSprop, {"rho": 1.5}, ValueError, r"rmsprop: rho must be .* got rho=1.5"),
    (pk.SGD, {"learning_rate": -0.1}, ValueError, r"learning_rate=-0.1"),
    (pk.SGD, {"nesterov": 1}, TypeError, r"nesterov must be True or False"),
    (pk.Adam, {"epsilon": -1.0}, ValueError, r"epsilon=-1.0"),
    (pk.Adam, {"lr": 0.1}, TypeError, r"Adam: .*lr.*allowed arguments"),
    (pk.RAdam, {"total_steps": 1.5}, TypeError, r"total_steps must be an integer"),
    (pk.Ranger, {"sync_period": 0}, ValueError, r"sync_period"),
])
def test_bad_arguments_fail_at_construction(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(**kwargs)


def test_lookahead_checks_its_inner_optimizer():
    with pytest.raises(TypeError, match="optimizer must be a polyopt.keras optimizer"):
        pk.Lookahead(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="set clipnorm on the Lookahead"):
        pk.Lookahead(pk.Adam(clipnorm=1.0))
    with pytest.raises(ValueError, match="slow_step_size=2.0"):
        pk.Lookahead(pk.Adam(), slow_step_size=2.0)


def test_learning_rate_schedule_and_callable_as_with_the_native_optimizer():
    decay = keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.5)
    gap = side_by_side(pk.Adam(**{**ADAM_KERAS, "learning_rate": decay}),
                       keras.optimizers.Adam(learning_rate=decay), "float32", steps=40)
    assert gap <= 1e-5
    gap = side_by_side(pk.SGD(**polyopt_arguments(pk.SGD, "keras.optimizers.SGD", {}),
                              learning_rate=lambda: 0.05),
                       keras.optimizers.SGD(learning_rate=lambda: 0.05), "float32", steps=10)
    assert gap <= 1e-6


def test_polyopt_schedule_is_used_directly_and_serializes():
    schedule = schedules.exponential_decay(0.1, 10, 0.5)
    opt = pk.SGD(learning_rate=schedule)
    assert isinstance(opt._learning_rate, pk.PolyoptSchedule)
    variables = [keras.Variable(np.zeros(3, np.float32))]
    for _ in range(5):
        opt.apply_gradients(zip([keras.ops.ones((3,))], variables))
    expected = -sum(schedule(t) for t in range(5))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variables[0]), expected, rtol=1e-6)
    again = pk.SGD.from_config(opt.get_config())
    assert isinstance(again._learning_rate, pk.PolyoptSchedule)
    assert again._learning_rate.schedule.config == schedule.config
    step = keras.ops.convert_to_tensor(7)
    assert float(again._learning_rate(step)) == pytest.approx(schedule(7), rel=1e-6)


def test_weight_decay_is_the_rules_and_exclusions_work():
    """Excluded variables get no decay; the others Keras' decoupled decay (preset)."""
    options = {"learning_rate": 0.01, "weight_decay": 0.1}
    make_vars = lambda: [keras.Variable(np.ones((2, 2), np.float32), name="kernel"),  # noqa: E731
                         keras.Variable(np.ones(2, np.float32), name="bias")]
    ours = pk.Adam(**{**ADAM_KERAS, **options})
    theirs = keras.optimizers.Adam(**options)
    a, b = make_vars(), make_vars()
    ours.exclude_from_weight_decay(var_names=["bias"])
    theirs.exclude_from_weight_decay(var_names=["bias"])
    grads = [keras.ops.ones((2, 2)), keras.ops.ones((2,))]
    for _ in range(3):
        ours.apply_gradients(zip(grads, a))
        theirs.apply_gradients(zip(grads, b))
    for x, y in zip(a, b):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y),
                                   rtol=1e-6)
    assert ours.get_config()["weight_decay"] == 0.1


def test_defaults_are_the_cores():
    assert pk.Adam().get_config()["epsilon"] == hyper.ADAM["eps"].default == 1e-8
    assert pk.Adadelta().get_config()["learning_rate"] == 1.0
    assert native.PRESETS["keras.optimizers.Adadelta"][1]["learning_rate"] == 0.001
    # the differences from keras.optimizers are documented, generated from the presets
    assert "epsilon=1e-08 (Keras: 1e-07)" in pk.Adam.__doc__
    assert "learning_rate=1.0 (Keras: 0.001)" in pk.Adadelta.__doc__


def test_importing_the_adapter_imports_no_other_framework():
    code = ("import sys, keras; before = set(sys.modules); import polyopt.keras; "
            "print(sorted({'torch', 'tensorflow', 'jax', 'optax'} & (set(sys.modules) - before)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": BACKEND,
                               "PYTHONPATH": os.getcwd()}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_embedding_gradients_are_dense():
    """Embedding layers give TensorFlow IndexedSlices gradients; polyopt densifies them
    (every row's moments decay), as Keras does on JAX and torch. The reference is the
    native optimizer on the same model written as one_hot(x) @ E (dense gradients).
    Native keras.optimizers on TensorFlow update only the rows in the IndexedSlices
    instead, so on that backend native Keras differs from itself on the others."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=(64, 4))
    y = rng.normal(size=(64, 1)).astype(np.float32)
    table = rng.normal(size=(20, 3)).astype(np.float32) * 0.1
    head = [rng.normal(size=(12, 1)).astype(np.float32) * 0.1, np.zeros(1, np.float32)]

    def train(optimizer, one_hot):
        if one_hot:
            first = keras.layers.Dense(3, use_bias=False)
            inputs = keras.Input((4, 20))
            data = np.eye(20, dtype=np.float32)[x]
        else:
            first = keras.layers.Embedding(20, 3)
            inputs = keras.Input((4,), dtype="int32")
            data = x
        model = keras.Sequential([inputs, first, keras.layers.Flatten(), keras.layers.Dense(1)])
        model.set_weights([table, *head])
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(data, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        return _weights(model)

    ours = train(pk.Adam(**{**ADAM_KERAS, "learning_rate": 0.01}), one_hot=False)
    dense = train(keras.optimizers.Adam(learning_rate=0.01), one_hot=True)
    for a, b in zip(ours, dense):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mixed_precision_wraps_in_loss_scale_optimizer():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, history = _fit(pk.Lookahead(pk.Nadam(learning_rate=0.01)), epochs=3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


if BACKEND == "tensorflow":

    def test_tf_train_checkpoint_restores_the_optimizer_state(tmp_path):
        import tensorflow as tf

        model, _ = _fit(pk.Lookahead(pk.Nadam()), epochs=1)
        path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
            str(tmp_path / "ckpt"))
        other = _model()
        other.compile(optimizer=pk.Lookahead(pk.Nadam()), loss="mse")
        other.optimizer.build(other.trainable_variables)
        tf.train.Checkpoint(model=other, optimizer=other.optimizer).read(path).assert_consumed()
        assert len(other.optimizer.variables) == len(model.optimizer.variables) > 10
        for a, b in zip(other.optimizer.variables, model.optimizer.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())

    def test_slots_built_inside_the_first_traced_step_as_keras():
        # A model without an input shape is built inside the traced first step
        # (its variables have no value to read yet): the zero slots need none and
        # give Keras's numbers.
        x = np.linspace(-1, 1, 8, dtype="float32").reshape(4, 2)
        y = np.ones((4, 2), dtype="float32")
        weights = []
        for optimizer in (keras.optimizers.Adam(0.1), pk.Adam(
                **polyopt_arguments(pk.Adam, "keras.optimizers.Adam", {"learning_rate": 0.1}))):
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.layers.Dense(2)])
            model.compile(optimizer=optimizer, loss="mse")
            for _ in range(3):
                model.train_on_batch(x, y)
            weights.append([w.numpy() for w in model.weights])
        for ours, theirs in zip(weights[1], weights[0]):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)  # float32 rounding

    @pytest.mark.parametrize("name", ["ScheduleFreeAdamW", "Ranger"])
    def test_state_copying_the_params_built_inside_the_first_traced_step(name):
        # Schedule-Free's z and Ranger's slow weights start as copies of the params,
        # which TensorFlow cannot read while it traces the first step of a model built
        # lazily: the first step makes them in the graph, so training gives the numbers
        # of an optimizer built first, bit for bit. (The native ScheduleFreeAdamW built
        # lazily records its copy into the traced step and copies the params into z
        # again at every step: it differs from itself built first. Its TensorFlow
        # numbers differ from its JAX ones anyway, docs/conventions.md.)
        x = np.linspace(-1, 1, 20, dtype="float32").reshape(4, 5)
        y = np.ones((4, 10), dtype="float32")
        preset = {"ScheduleFreeAdamW": {"learning_rate": 0.1}, "Ranger": {}}[name]

        def train(make, build_first):
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.layers.Dense(10)])
            optimizer = make()
            model.compile(optimizer=optimizer, loss="mse")
            if build_first:
                model.build((None, 5))
                optimizer.build(model.trainable_variables)
            model.fit(x, y, batch_size=4, epochs=5, shuffle=False, verbose=0)
            return [w.numpy() for w in model.weights]

        if name == "ScheduleFreeAdamW":
            arguments = polyopt_arguments(pk.ScheduleFreeAdamW,
                                          "keras.optimizers.ScheduleFreeAdamW", preset)
            ours = lambda: pk.ScheduleFreeAdamW(**arguments)  # noqa: E731
        else:
            ours = pk.Ranger
        lazily, first = train(ours, False), train(ours, True)
        keras.utils.set_random_seed(0)
        initial = keras.Sequential([keras.Input((5,)), keras.layers.Dense(10)]).get_weights()
        assert np.max(np.abs(first[0] - initial[0])) > 1e-4  # it trained
        for a, b in zip(lazily, first):
            np.testing.assert_array_equal(a, b)
        if name == "ScheduleFreeAdamW":
            native = lambda: keras.optimizers.ScheduleFreeAdamW(**preset)  # noqa: E731
            assert np.max(np.abs(train(native, False)[0] - train(native, True)[0])) > 1e-2
