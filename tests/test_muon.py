"""Muon: Newton-Schulz orthogonalizes, a step descends, train.py trains with it and resumes exactly."""
import copy
import json

import pytest
import torch

import train
from muon import Muon, newton_schulz

from conftest import TINY, stopped_and_resumed

TINY = TINY + ["--optimizer=muon"]


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 32)])
def test_newton_schulz_output_is_nearly_orthogonal(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape) * 3.0
    X = newton_schulz(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    s = torch.linalg.svdvals(X)
    # the quintic leaves singular values in a band around 1 (about 0.68 to 1.2), not exactly at 1
    assert s.min() > 0.5 and s.max() < 1.5
    # and the same singular directions: X is close to U V^T of G
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = (X * (U @ Vh)).sum() / (X.norm() * (U @ Vh).norm())
    assert cos > 0.95


def test_one_step_lowers_a_quadratic():
    torch.manual_seed(0)
    target = torch.randn(16, 32)
    w = torch.nn.Parameter(torch.zeros(16, 32))
    opt = Muon([w], lr=0.1, momentum=0.9, weight_decay=0.0)
    loss = lambda: 0.5 * (w - target).pow(2).sum()
    before = loss()
    before.backward()
    opt.step()
    assert loss().item() < before.item() * 0.99


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="only matrices"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_a_matrix_without_gradient_is_left_alone():
    """A whole group may have no gradients (frozen, or unused this step): no move, no momentum."""
    frozen, trained = torch.nn.Parameter(torch.ones(4, 6)), torch.nn.Parameter(torch.ones(6, 4))
    opt = Muon([{"params": [frozen]}, {"params": [trained], "lr": 0.1}], weight_decay=0.1)
    trained.grad = torch.randn(6, 4)
    opt.step()
    assert torch.equal(frozen, torch.ones(4, 6)) and not torch.equal(trained, torch.ones(6, 4))
    assert frozen not in opt.state and opt.orthogonalized == 1


def test_state_dict_round_trips():
    """Two optimizers, one restored from the other's state_dict, take identical steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 24, bias=False), torch.nn.Linear(24, 4, bias=False))
    opt = Muon(model.parameters(), lr=0.05, weight_decay=0.1)
    x = torch.randn(10, 8)

    def step(m, o):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    twin = copy.deepcopy(model)
    twin_opt = Muon(twin.parameters(), lr=0.05, weight_decay=0.1)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        step(model, opt)
        step(twin, twin_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_train_with_muon_learns_and_resumes_exactly(corpus, monkeypatch):
    args = TINY + [f"--data_dir={corpus}", "--max_iters=12", "--eval_interval=4"]
    train.main(args + [f"--out_dir={corpus}/full"])
    full = torch.load(corpus / "full" / "ckpt.pt", weights_only=False)
    assert len(full["optimizers"]) == 2 and full["optimizers"][0]["state"]  # Muon state saved
    with open(corpus / "full" / "metrics.jsonl") as f:
        evals = [r["val_loss"] for r in map(json.loads, f) if r["type"] == "eval"]
    assert evals[-1] < evals[0] - 0.5, evals

    cut = stopped_and_resumed(monkeypatch, args, corpus / "cut", 5)
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
