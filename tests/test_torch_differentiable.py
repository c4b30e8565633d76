"""differentiable=True: polyopt.torch's step is recorded by autograd as torch.optim's.

Every torch.optim optimizer that declares differentiable support (in torch's
optimizer database) and has a polyopt preset is run side by side with the
native, in float64:

- one step from a given state (torch's own differentiable tests give the
  param, its grad and every floating state tensor ``requires_grad``): the
  new param and state, and their derivatives with respect to the param, the
  grad and the state, against the native's; torch.autograd.gradcheck of
  polyopt's step (its derivatives against finite differences of itself);
- three steps whose grads are themselves differentiable (``create_graph``),
  then the loss's derivatives with respect to the starting param and to
  tensor hyperparameters (lr, weight_decay, betas), against the native's,
  wherever the native accepts those tensors;
- several steps of the optimizers whose native cannot be differentiated
  through several steps (it changes in place a tensor its recorded graph
  saved): polyopt's derivatives against gradcheck's finite differences.

The default step (differentiable=False) keeps the eager chunked path.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import polyopt.torch as pt

# native -> options that give it its full state (and the code paths that matter)
NATIVES = {
    "Adadelta": {"weight_decay": 0.1},
    "Adagrad": {"weight_decay": 0.1, "lr_decay": 0.01},
    "Adam": {"amsgrad": True, "weight_decay": 0.1},
    "Adamax": {"weight_decay": 0.1},
    "AdamW": {"amsgrad": True},
    "NAdam": {"weight_decay": 0.1},
    "NAdam(decoupled)": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "RAdam": {"weight_decay": 0.1},
    "RAdam(decoupled)": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "RMSprop": {"momentum": 0.9, "centered": True, "weight_decay": 0.1, "maximize": True},
    "SGD": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1},
    "SGD(nesterov)": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
}


def _classes(name: str):
    base = name.split("(")[0]
    return (getattr(torch.optim, base),
            lambda params, **kw: pt.preset(f"torch.optim.{base}", params, **kw))


def _state(name: str, generator: torch.Generator) -> dict:
    """A state as the native keeps it after some steps (its keys, from a real
    step of the native), every floating tensor a leaf that requires grad;
    the count at 10 (not differentiable, as in torch's tests)."""
    native, _ = _classes(name)
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True).clone()
    p.grad = torch.ones(4, dtype=torch.float64)
    optimizer = native([p], differentiable=True, **NATIVES[name])
    optimizer.step()
    state = {}
    for key, value in optimizer.state[p].items():
        if key == "step" or value.ndim == 0 and key != "mu_product":
            continue
        if key == "mu_product":  # a product of momentum factors below 1
            state[key] = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        elif key == "grad_avg":  # small, so that square_avg - grad_avg**2 stays positive
            state[key] = (1e-2 * torch.rand(10, generator=generator, dtype=torch.float64)
                          ).requires_grad_()
        else:
            state[key] = (torch.rand(10, generator=generator, dtype=torch.float64)
                          + 0.1).requires_grad_()
    # the count: torch's SGD keeps none (its buffer's presence says a step was
    # taken), polyopt's SGD reads it; torch's SGD ignores the extra entry
    state["step"] = torch.tensor(10.0, dtype=torch.float64)
    return state


def _one_step(make, kwargs: dict, p, grad, state: dict):
    """torch's own differentiable check: a clone of p, its grad and a clone of
    the state, one step; the new param and the state tensors that require grad."""
    p = p.clone()
    p.grad = grad
    optimizer = make([p], differentiable=True, **kwargs)
    optimizer.state[p].update({k: v.clone() for k, v in state.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .grad of a non-leaf
        optimizer.step()
    new = {k: v for k, v in optimizer.state[p].items() if v.requires_grad}
    return p, new


@pytest.mark.parametrize("name", list(NATIVES))
def test_one_step_and_its_derivatives_are_the_natives(name):
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(10, generator=generator, dtype=torch.float64).requires_grad_()
    grad = torch.rand(10, generator=generator, dtype=torch.float64).requires_grad_()
    state = _state(name, generator)
    inputs = [p, grad] + [v for v in state.values() if v.requires_grad]
    results = []
    for make in _classes(name):
        new_p, new_state = _one_step(make, NATIVES[name], p, grad, state)
        outputs = {"param": new_p, **new_state}
        # every output, weighted, differentiated into every input
        weights = torch.Generator().manual_seed(1)
        total = sum((torch.rand(v.shape, generator=weights, dtype=torch.float64) * v).sum()
                    for _, v in sorted(outputs.items()))
        derivatives = torch.autograd.grad(total, inputs, allow_unused=True)
        results.append((outputs, derivatives))
    (native, native_d), (ours, our_d) = results
    assert sorted(ours) == sorted(native)  # the same state tensors are recorded
    for key in native:
        torch.testing.assert_close(ours[key].detach(), native[key].detach(),
                                   rtol=1e-12, atol=1e-14)
    assert len(our_d) == len(native_d) >= 3
    for a, b in zip(our_d, native_d):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert our_d[0] is not None and our_d[1] is not None  # into the param and the grad


@pytest.mark.parametrize("name", list(NATIVES))
def test_gradcheck_of_one_step(name):
    generator = torch.Generator().manual_seed(2)
    p = torch.rand(10, generator=generator, dtype=torch.float64).requires_grad_()
    grad = torch.rand(10, generator=generator, dtype=torch.float64).requires_grad_()
    state = _state(name, generator)
    keys = [k for k, v in state.items() if v.requires_grad]
    _, ours = _classes(name)

    def step(p, grad, *tensors):
        new_p, new_state = _one_step(ours, NATIVES[name], p, grad,
                                     {**state, **dict(zip(keys, tensors))})
        return (new_p, *(new_state[k] for k in sorted(new_state)))

    assert torch.autograd.gradcheck(step, (p, grad, *(state[k] for k in keys)))


def _several_steps(make, kwargs: dict, p0, hypers: dict, steps: int = 3, state=None):
    """``steps`` steps on a loss whose grads keep their graph (create_graph),
    and the loss at the end (torch's multi-step check of tensor hyperparameters).
    The loss saves no param for its backward: the step changes the param in
    place (torch.optim's and polyopt's alike), which a saved param forbids."""
    kwargs = dict(kwargs)
    given = {k: v.clone() for k, v in hypers.items()}  # the graph starts at ``hypers``
    if "beta1" in given:
        given["betas"] = (given.pop("beta1"), given.pop("beta2"))
    p = p0.clone()
    optimizer = make([p], differentiable=True, **{**kwargs, **given})
    optimizer.state[p].update({k: v.clone() for k, v in (state or {}).items()})
    x = torch.tensor([1.0, -0.5], dtype=torch.float64)
    y = torch.tensor([2.0, 0.5], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .grad of a non-leaf
        for _ in range(steps):
            loss = ((x * p.sum() - y) ** 2).mean()
            loss.backward(inputs=(p,), create_graph=True)
            optimizer.step()
            optimizer.zero_grad()
    return ((x * p.sum() - y) ** 2).mean()


def _hypers(names) -> dict:
    values = {"lr": 0.05, "weight_decay": 0.3, "beta1": 0.9, "beta2": 0.99}
    return {k: torch.tensor(values[k], dtype=torch.float64, requires_grad=True) for k in names}


# the natives' tensor hyperparameters that their differentiable step records
# (torch.optim's other natives refuse a Tensor lr or weight_decay there: their
# in-place ops take a Number). SGD with momentum starts from a momentum buffer
# that requires grad, as torch's own check does: from no buffer, torch.optim.SGD
# detaches the first one (grad.detach().clone()), polyopt records it
TENSOR_HYPERS = [
    ("Adam", {}, ("lr", "weight_decay", "beta1", "beta2")),
    ("AdamW", {}, ("lr", "weight_decay", "beta1", "beta2")),
    ("SGD", {}, ("lr", "weight_decay")),
    ("SGD", {"momentum": 0.9, "nesterov": True}, ("lr",)),
    ("RAdam", {}, ("lr",)),
]


def _momentum_state() -> dict:
    generator = torch.Generator().manual_seed(3)
    return {"momentum_buffer": torch.rand(10, generator=generator,
                                          dtype=torch.float64).requires_grad_(),
            "step": torch.tensor(10.0, dtype=torch.float64)}


@pytest.mark.parametrize("name, kwargs, names", TENSOR_HYPERS,
                         ids=[f"{n}-{'-'.join(h)}{'-' + '-'.join(k) if k else ''}"
                              for n, k, h in TENSOR_HYPERS])
def test_several_steps_into_tensor_hyperparameters_as_the_native(name, kwargs, names):
    p0 = torch.linspace(-0.5, 0.7, 10, dtype=torch.float64).requires_grad_()
    hypers = _hypers(names)
    state = _momentum_state() if kwargs.get("momentum") else {}
    inputs = [p0, *hypers.values(), *(v for v in state.values() if v.requires_grad)]
    results = []
    for make in _classes(name):
        loss = _several_steps(make, kwargs, p0, hypers, state=state)
        results.append((loss.detach(), torch.autograd.grad(loss, inputs)))
    (native_loss, native_d), (our_loss, our_d) = results
    torch.testing.assert_close(our_loss, native_loss, rtol=1e-12, atol=1e-14)
    for a, b in zip(our_d, native_d):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert all(d.abs().sum() > 0 for d in our_d)  # every input reaches the loss


# the natives whose differentiable step cannot be differentiated through
# several steps (the backward raises: their step changes in place a tensor
# the recorded graph saved); polyopt's derivatives against finite differences
SEVERAL_STEPS_ONLY_OURS = [
    ("Adamax", {"weight_decay": 0.1}, ("lr", "weight_decay", "beta1", "beta2")),
    ("RMSprop", {"centered": True, "momentum": 0.5}, ("lr", "weight_decay")),
    ("Adam", {"amsgrad": True}, ("lr", "weight_decay", "beta1", "beta2")),
    ("AdamW", {"amsgrad": True}, ("lr", "weight_decay", "beta1", "beta2")),
    ("SGD", {"momentum": 0.9, "dampening": 0.1}, ("lr", "weight_decay")),
    ("NAdam", {}, ("lr", "weight_decay", "beta1", "beta2")),
    ("Adagrad", {}, ("lr", "weight_decay")),
    ("Adadelta", {}, ("lr", "weight_decay")),
]


@pytest.mark.parametrize("name, kwargs, names", SEVERAL_STEPS_ONLY_OURS,
                         ids=[f"{n}-{'-'.join(k)}" for n, k, _ in SEVERAL_STEPS_ONLY_OURS])
def test_several_steps_gradcheck_where_the_native_cannot(name, kwargs, names):
    native, ours = _classes(name)
    p0 = torch.linspace(-0.5, 0.7, 10, dtype=torch.float64).requires_grad_()
    hypers = _hypers(names)
    # the native's own multi-step derivative fails (or refuses the tensors)
    with pytest.raises((RuntimeError, TypeError)):
        torch.autograd.grad(_several_steps(native, kwargs, p0, hypers),
                            [p0, *hypers.values()])

    def loss(p0, *values):
        return _several_steps(ours, kwargs, p0, dict(zip(hypers, values)))

    assert torch.autograd.gradcheck(loss, (p0, *hypers.values()))
