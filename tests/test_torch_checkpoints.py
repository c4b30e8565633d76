"""polyopt.torch checkpoints: the step count at the int32 limit, bad files, kill -9.

- torch keeps ``state['step']`` as a float tensor; a step at or beyond 2**31
  (float32 rounds 2**31 - 2 up to 2**31) reaches the rule as the int32 limit,
  never as a wrapped negative count;
- a truncated, empty or foreign state file is refused naming the path, and
  the optimizer is unchanged;
- examples.resume trains the MNIST MLP in a subprocess and kills it with
  SIGKILL (between steps, in a checkpoint write, during start-up): every
  restart resumes from the last complete checkpoint, 0 bytes are lost, and
  the final weights are bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import polyopt.torch as pt
from examples import resume
from polyopt.interop import StateFileError
from tests._checkpoints import BAD_STATE_FILES, assert_survived, run_campaign

LIMIT = 2**31 - 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_step_at_the_int32_limit_saturates_and_adam_keeps_stepping(compiled):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    g = np.array([0.5, -1.0, 2.0])
    opt = pt.Adam([p], lr=0.1, compiled=compiled)
    p.grad = torch.tensor(g)
    opt.step()
    state = opt.state[p]
    state["step"].fill_(LIMIT - 1)  # float32: 2**31 exactly
    m, v = state["exp_avg"].numpy().copy(), state["exp_avg_sq"].numpy().copy()
    for _ in range(3):
        before = p.detach().numpy().copy()
        opt.step()
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        # t ~ 2**31: 0.9 ** t = 0.999 ** t = 0, the corrections are 1
        np.testing.assert_allclose(p.detach().numpy(), before - 0.1 * m / (np.sqrt(v) + 1e-8),
                                   rtol=1e-12)
    assert float(state["step"]) == float(torch.tensor(LIMIT, dtype=state["step"].dtype))
    buffer = io.BytesIO()
    opt.export_state(buffer)
    buffer.seek(0)
    with np.load(buffer) as saved:
        assert saved["count"].dtype == np.int32 and int(saved["count"]) == LIMIT


def test_lookahead_count_beyond_the_limit_does_not_wrap():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = pt.Lookahead(pt.SGD([p], lr=0.1), k=2, alpha=0.5)
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    opt.state[p]["step"].fill_(2.0**33)
    opt.step()
    assert float(opt.state[p]["step"]) == float(torch.tensor(LIMIT, dtype=torch.float32))
    assert torch.all(torch.isfinite(p))


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    opt = pt.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(4, 3, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("content, reason", BAD_STATE_FILES)
def test_bad_state_files_are_refused_with_the_path_and_change_nothing(tmp_path, content, reason):
    model, opt = _trained()
    good = tmp_path / "good.npz"
    opt.export_state(good, names=model)
    raw = good.read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content if content else b"")
    before = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    with pytest.raises(StateFileError, match=rf"{bad}: {reason}"):
        opt.import_state(bad, names=model)
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k][n], t) for k, s in before.items() for n, t in s.items())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) - 50])
    with pytest.raises(StateFileError, match=rf"{truncated}: not a readable"):
        opt.import_state(truncated, names=model)


# --------------------------------------------------------------------------
# kill -9


def test_kill_9_three_times_resumes_bitwise(tmp_path):
    assert_survived(run_campaign("torch", tmp_path, kills=3, steps=30, seed=1), 3)


@pytest.mark.slow
def test_kill_9_twenty_one_times_resumes_bitwise(tmp_path):
    assert_survived(run_campaign("torch", tmp_path, kills=21, steps=70, seed=2), 21)


def test_the_campaign_catches_a_checkpoint_written_straight_onto_the_file(tmp_path):
    """The control: the same kills against np.savez-style writes onto the target."""
    report = resume.campaign(resume.Config("torch", steps=20, every=5), tmp_path, kills=2,
                             seed=1, slow_write=0.3, direct_write=True)
    print(report.text())
    assert report.by_kind["mid-write"] == 1 and report.over_a_checkpoint == 1
    assert report.bytes_lost > 0 and not report.passed
    assert any("is not intact" in failure for failure in report.failures)
