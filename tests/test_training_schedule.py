"""Learning-rate schedule: linear warm-up from 1 %, cosine to a 1 % floor, per-group base rates kept."""

from __future__ import annotations

import math

import pytest
import torch

from refdecoder.errors import ConfigError
from refdecoder.training.schedule import warmup_cosine, warmup_cosine_factor


def _by_hand(step: int, total: int = 100, warmup: int = 10, start: float = 0.01, floor: float = 0.01) -> float:
    if step < warmup:
        return start + (1 - start) * step / warmup
    t = min(step, total) - warmup
    return floor + (1 - floor) * (1 + math.cos(math.pi * t / (total - warmup))) / 2


@pytest.mark.parametrize("step", [0, 1, 5, 9, 10, 11, 32, 55, 77, 99, 100, 150])
def test_factor_matches_the_formula(step):
    assert warmup_cosine_factor(step, 100, 10, 0.01, 0.01) == pytest.approx(_by_hand(step), abs=1e-12)


def test_landmarks():
    assert warmup_cosine_factor(0, 100, 10) == pytest.approx(0.01)  # warm-up starts at 1 %
    assert warmup_cosine_factor(10, 100, 10) == pytest.approx(1.0)  # peak after warm-up
    assert warmup_cosine_factor(55, 100, 10) == pytest.approx(0.505)  # half-way down the cosine
    assert warmup_cosine_factor(100, 100, 10) == pytest.approx(0.01)  # floor at the end
    assert warmup_cosine_factor(10_000, 100, 10) == pytest.approx(0.01)  # and it stays there
    assert warmup_cosine_factor(0, 100, 0) == pytest.approx(1.0)  # no warm-up


def test_scheduler_keeps_the_decoder_group_ratio():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [a], "lr": 2e-4}, {"params": [b], "lr": 2e-5}])
    scheduler = warmup_cosine(optimizer, total_steps=100, warmup_steps=10)
    for step in range(120):
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs[0] == pytest.approx(2e-4 * _by_hand(step), rel=1e-9)
        assert lrs[1] == pytest.approx(0.1 * lrs[0], rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_scheduler_state_round_trip():
    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([p], lr=1.0)
        return optimizer, warmup_cosine(optimizer, 50, 5)

    optimizer, scheduler = make()
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    optimizer2, scheduler2 = make()
    optimizer2.load_state_dict(optimizer.state_dict())  # as a checkpoint restores both
    scheduler2.load_state_dict(scheduler.state_dict())
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(_by_hand(17, 50, 5))
    optimizer2.step()
    scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(_by_hand(18, 50, 5))


def test_bad_arguments():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError):
        warmup_cosine(optimizer, total_steps=0, warmup_steps=0)
    with pytest.raises(ConfigError):
        warmup_cosine(optimizer, total_steps=10, warmup_steps=1, warmup_start=0.0)
