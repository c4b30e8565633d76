"""SAMModel: sharpness-aware minimization inside ``model.fit``, on every Keras backend.

The two-gradient protocol of ``polyopt.rules.sam`` in a ``train_step``: the
gradient g at the weights w; the perturbed weights w' = ``perturb(w, g)``
(``rho * g / (||g|| + eps)``, one norm over all weights; ASAM with
``adaptive=True``) from the core; the gradient g' at w'; then the compiled
optimizer applies g' to w. The loss and metrics reported are those at w (as
davda54/sam reports the first pass).
"""

from __future__ import annotations

from typing import Any

import keras

from polyopt import hyper, rules

_BACKEND = keras.backend.backend()


@keras.saving.register_keras_serializable(package="polyopt")
class SAMModel(keras.Model):
    """Wrap ``model`` so that ``fit`` trains it with SAM (Foret et al., 2021).

    >>> sam = SAMModel(model, rho=0.05)                              # doctest: +SKIP
    >>> sam.compile(optimizer=polyopt.keras.SGD(momentum=0.9), loss="mse")  # doctest: +SKIP
    >>> sam.fit(x, y)            # trains model's weights           # doctest: +SKIP

    Args:
      model: the Keras model to train (its weights are this model's weights).
      rho=0.05, eps=1e-12, adaptive=False: ``polyopt.rules.sam``'s (rho >= 0,
        eps >= 0 added to the gradient norm, ASAM).

    Each step costs two forward and backward passes. Layers with training
    state (BatchNormalization) update it in both passes on TensorFlow and
    torch; on JAX only the first pass's update is kept. Prediction and
    evaluation call ``model``. Save ``sam_model.model`` (the wrapped model).
    """

    def __init__(self, model: keras.Model, rho: float = 0.05, eps: float = 1e-12,
                 adaptive: bool = False, **kwargs: Any) -> None:
        values = hyper.SAM.validate({"rho": rho, "eps": eps, "adaptive": adaptive},
                                    framework="keras")
        super().__init__(**kwargs)
        self.model = model
        self.rho, self.eps, self.adaptive = values["rho"], values["eps"], values["adaptive"]
        # only perturb is used: the compiled Keras optimizer makes the update
        self._perturb = rules.sam(rules.sgd(), **values).perturb

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def get_config(self) -> dict[str, Any]:
        return {"model": keras.saving.serialize_keras_object(self.model), "rho": self.rho,
                "eps": self.eps, "adaptive": self.adaptive, "name": self.name}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SAMModel:
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)

    # ---- the train steps

    def _batch_size(self, x):
        return next(i for i in keras.tree.flatten(x) if i is not None).shape[0]

    if _BACKEND == "tensorflow":

        def train_step(self, data):
            import tensorflow as tf

            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            variables = self.trainable_variables
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                         training=True)
                self._loss_tracker.update_state(loss, sample_weight=tf.shape(
                    next(i for i in keras.tree.flatten(x) if i is not None))[0])
                scaled = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, variables)
            grads = self._all_reduce(grads)
            params = [tf.convert_to_tensor(v.value) for v in variables]
            for v, p in zip(variables, self._perturb(params, grads)):
                v.assign(p)
            with tf.GradientTape() as tape:
                perturbed_loss = self.compute_loss(
                    x=x, y=y, y_pred=self(x, training=True), sample_weight=sample_weight,
                    training=True)
                perturbed_loss = self.optimizer.scale_loss(perturbed_loss)
            perturbed_grads = tape.gradient(perturbed_loss, variables)
            for v, p in zip(variables, params):
                v.assign(p)
            self.optimizer.apply_gradients(zip(perturbed_grads, variables))
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

        def _all_reduce(self, grads):
            """Under tf.distribute, the ascent uses the global gradient (all replicas)."""
            import tensorflow as tf

            context = tf.distribute.get_replica_context()
            if context is None or context.num_replicas_in_sync == 1:
                return grads
            return context.all_reduce(tf.distribute.ReduceOp.SUM, grads)

    elif _BACKEND == "torch":

        def train_step(self, data):
            import torch

            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            variables = self.trainable_variables[:]
            y_pred = self(x, training=True)
            self.zero_grad()
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                     training=True)
            self._loss_tracker.update_state(loss, sample_weight=self._batch_size(x))
            self.optimizer.scale_loss(loss).backward()
            grads = [v.value.grad.clone() for v in variables]
            with torch.no_grad():
                params = [v.value.detach().clone() for v in variables]
                for v, p in zip(variables, self._perturb(params, grads)):
                    v.assign(p)
            self.zero_grad()
            perturbed_loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True),
                                               sample_weight=sample_weight, training=True)
            self.optimizer.scale_loss(perturbed_loss).backward()
            perturbed_grads = [v.value.grad for v in variables]
            with torch.no_grad():
                for v, p in zip(variables, params):
                    v.assign(p)
                self.optimizer.apply(perturbed_grads, variables)
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    elif _BACKEND == "jax":

        def train_step(self, state, data):
            import jax

            trainable, non_trainable, optimizer_variables, metrics_variables = state
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
            (_, aux), grads = grad_fn(trainable, non_trainable, metrics_variables, x, y,
                                      sample_weight, training=True,
                                      optimizer_variables=optimizer_variables)
            unscaled_loss, y_pred, new_non_trainable, new_metrics_variables = aux
            perturbed = self._perturb(list(trainable), list(grads))
            _, perturbed_grads = grad_fn(perturbed, non_trainable, metrics_variables, x, y,
                                         sample_weight, training=True,
                                         optimizer_variables=optimizer_variables)
            trainable, optimizer_variables = self.optimizer.stateless_apply(
                optimizer_variables, perturbed_grads, trainable)
            logs, new_metrics_variables = self._update_metrics_variables(
                new_metrics_variables, unscaled_loss, x, y, y_pred, sample_weight)
            return logs, (trainable, new_non_trainable, optimizer_variables,
                          new_metrics_variables)
