"""The matrix's models, written natively in each framework from one neutral layout.

``init`` (numpy only) holds the layouts and the initial weights; ``torch_models``,
``keras_models`` and ``jax_models`` build the same three models (``mlp``,
``cnn``, ``resnet20``) in torch.nn, Keras 3 and plain JAX and convert weights
to and from the neutral layout. Import only the module of the framework in
use: each imports its framework.
"""
