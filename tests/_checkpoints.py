"""Shared by the three frameworks' checkpoint tests: bad state files, and the
kill -9 campaign of examples.resume with its verdict."""

from __future__ import annotations

import io

import numpy as np
import pytest

from examples import resume


def foreign_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, weights=np.ones(3))
    return buffer.getvalue()


#: (content, what load_state says about it), as pytest params
BAD_STATE_FILES = [
    pytest.param(b"", r"not a readable polyopt state file", id="empty"),
    pytest.param(b"PK\x03\x04" + b"\x00" * 40, r"not a readable polyopt state file",
                 id="truncated-zip"),
    pytest.param(foreign_npz(), r"no __polyopt__ header: not a polyopt state file",
                 id="foreign-npz"),
    pytest.param(b"step,loss\n1,0.5\n", r"not a readable polyopt state file", id="csv"),
]


def assert_survived(report: resume.Report, kills: int) -> None:
    assert report.failures == []
    assert report.kills == kills and report.bytes_lost == 0
    assert report.by_kind["mid-write"] >= kills // 3
    assert report.temporary_seen_at_kill == report.by_kind["mid-write"]
    assert report.over_a_checkpoint == report.by_kind["mid-write"]
    # every process resumes but the first and those killed in start-up
    assert report.resumes >= report.processes - 1 - report.by_kind["start-up"]
    assert report.final_bitwise_equal


def run_campaign(framework: str, directory, *, kills: int, steps: int,
                 seed: int) -> resume.Report:
    """examples.resume's campaign on the MNIST MLP, a checkpoint every 5 steps, each
    checkpoint write spread over 0.3 s (so that mid-write kills land in it)."""
    report = resume.campaign(resume.Config(framework, steps=steps, every=5), directory,
                             kills=kills, seed=seed, slow_write=0.3)
    print(report.text())
    return report
