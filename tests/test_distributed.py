"""Data-parallel JAX training matches one device with the same global batch.

polyopt.optax.adam under jit with the batch sharded over 2 host devices
(XLA_FLAGS in a child process), params replicated. float32; the tolerance is
1e-5 relative (the reductions are split differently, so the last bits
differ; measured ~1e-7). torch (FSDP2, DDP, DCP) is in
tests/test_torch_distributed.py, JAX meshes of every optimizer in
tests/test_jax_sharding.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests._native import run_python
from tests._v2_problem import max_rel

STEPS = 10
RTOL = 1e-5

_JAX_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import polyopt.optax
assert len(jax.devices()) == 2, jax.devices()
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
params = {"w1": jnp.asarray(rng.normal(size=(5, 8)) * 0.4, jnp.float32), "b1": jnp.zeros(8),
          "w2": jnp.asarray(rng.normal(size=(8, 2)) * 0.4, jnp.float32), "b2": jnp.zeros(2)}
params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
opt = polyopt.optax.adam(0.01)

def loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2)

@jax.jit
def step(p, s, x, y):
    u, s = opt.update(jax.grad(loss)(p, x, y), s, p)
    return optax.apply_updates(p, u), s

def train(p, x, y):
    s = opt.init(p)
    for _ in range(payload["steps"]):
        p, s = step(p, s, x, y)
    return p

single = train(params, x, y)
mesh = Mesh(np.array(jax.devices()), ("data",))
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
ys = jax.device_put(y, NamedSharding(mesh, P("data")))
ps = jax.device_put(params, NamedSharding(mesh, P()))
sharded = train(ps, xs, ys)
result = {"single": {k: np.asarray(v) for k, v in single.items()},
          "sharded": {k: np.asarray(v) for k, v in sharded.items()},
          "shards": len(xs.sharding.device_set)}
"""


@pytest.mark.needs("jax")
def test_jax_two_host_devices_match_one():
    out = run_python(_JAX_SCRIPT, {"steps": STEPS},
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                          "JAX_PLATFORMS": "cpu"})
    assert out["shards"] == 2
    keys = sorted(out["single"])
    diff = max_rel([np.asarray(out["sharded"][k]) for k in keys],
                   [np.asarray(out["single"][k]) for k in keys])
    print(f"JAX 2 host devices vs 1 device, adam: max rel diff {diff:.2e}")
    assert diff <= RTOL
