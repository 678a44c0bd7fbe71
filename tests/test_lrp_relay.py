"""The relay owns the tensor marks the engine and the rules share (``attnx.lrp.relay``)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from attnx.lrp import LRPEngine, get_preset
from attnx.lrp.relay import RELEVANCE_MARK, SCALE_MARK, Propagation, carries_relevance, is_exact_alias, scale_of

LRP = Path(__file__).resolve().parents[1] / "attnx" / "lrp"


def test_only_the_relay_spells_the_marks():
    for path in sorted(LRP.glob("*.py")):
        if path.name != "relay.py":
            text = path.read_text()
            assert "_attnx_" not in text, f"{path.name} spells a tensor mark; use the names of attnx.lrp.relay"
    assert RELEVANCE_MARK.startswith("_attnx_") and SCALE_MARK.startswith("_attnx_")


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x * 0.25
        k = q / 2.0
        self.seen += [q, k]
        return (k * x).sum(-1, keepdim=True)


def test_the_engine_marks_what_the_rules_read():
    model = Scaled()
    x = torch.randn(2, 3)
    with torch.enable_grad(), LRPEngine(model, get_preset("attnlrp"), strict=False) as engine:
        root = engine.track(x)
        model(root)
    engine.release()
    q, k = model.seen
    assert carries_relevance(root) and carries_relevance(q) and carries_relevance(k)
    assert not carries_relevance(x)  # the user's tensor is not marked
    assert scale_of(q) == 0.25 and scale_of(k) == 0.125 and scale_of(x) == 1.0


def test_exact_alias():
    t = torch.randn(2, 3)
    assert is_exact_alias(t, t) and is_exact_alias(t.view(2, 3), t)
    assert not is_exact_alias(t.clone(), t)
    assert not is_exact_alias(t.t(), t)  # same storage, other strides
    assert not is_exact_alias(t[:1], t) and not is_exact_alias(None, t)


def test_scratch_is_one_buffer_per_slot_and_shape_until_release():
    state = Propagation()
    a = state.scratch(0, torch.Size([2, 3]), torch.float32, torch.device("cpu"))
    assert state.scratch(0, torch.Size([2, 3]), torch.float32, torch.device("cpu")) is a
    assert state.scratch(1, torch.Size([2, 3]), torch.float32, torch.device("cpu")) is not a
    assert state.scratch(0, torch.Size([3, 2]), torch.float32, torch.device("cpu")) is not a
    assert state.scratch(0, torch.Size([2, 3]), torch.float64, torch.device("cpu")) is not a
    state.release()
    assert state.scratch(0, torch.Size([2, 3]), torch.float32, torch.device("cpu")) is not a
    # off the CPU the device's caching allocator reuses memory: new tensors, nothing kept
    meta = torch.device("meta")
    assert state.scratch(0, torch.Size([2, 3]), torch.float32, meta) is not state.scratch(0, torch.Size([2, 3]), torch.float32, meta)
    assert state.output(torch.Size([2, 3]), torch.float32, meta).device == meta and not state.returned.pools.get(((2, 3), torch.float32, meta))


def test_a_returned_gradient_is_recycled_only_once_nothing_holds_it():
    """``Propagation.output`` hands out views of kept buffers; a buffer comes back only when no
    view of it is alive, whether Python or autograd holds the view."""
    state = Propagation()
    shape, cpu = torch.Size([4, 5]), torch.device("cpu")
    first = state.output(shape, torch.float32, cpu)
    first.fill_(1.0)
    second = state.output(shape, torch.float32, cpu)  # `first` is held: another buffer
    assert second.data_ptr() != first.data_ptr()
    kept = first.data_ptr()
    del first
    third = state.output(shape, torch.float32, cpu)
    assert third.data_ptr() == kept and third.shape == shape
    # held by autograd only (saved for a backward): not handed out again
    x = torch.ones(shape, requires_grad=True)
    y = x * third
    del third
    fourth = state.output(shape, torch.float32, cpu)
    assert fourth.data_ptr() not in (kept, second.data_ptr())
    del y
    assert state.output(shape, torch.float32, cpu).data_ptr() == kept
    # a relevance pass on a model gives the same relevance twice in a row (buffers reused)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
    xs = torch.randn(4, 5)

    def relevance():
        with torch.enable_grad(), LRPEngine(model, get_preset("chefer2021"), strict=True) as engine:
            root = engine.track(xs.clone())
            out = model(root)
        (g,) = torch.autograd.grad(out, root, torch.eye(3)[[0, 1, 2, 0]])
        return root.detach() * g

    assert torch.equal(relevance(), relevance())
