"""The non-finite guard (launch/nonfinite.py): a skipped update leaves weights, optimizer state and BatchNorm
statistics exactly as they were, for each way of skipping (fused AdamW's found_inf, the snapshot of any other
optimizer), and the run continues exactly as a twin run that never saw the bad step."""

from __future__ import annotations

import pytest
import torch
from timm.optim import Lars

from launch.nonfinite import NonFiniteGuard, honours_found_inf, nonfinite


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


OPTIMIZERS = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.05, fused=True),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.05, foreach=True),
    "lars": lambda p: Lars(p, lr=0.1, momentum=0.9),
}


def _step(model, opt, guard, x, y):
    guard.begin()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    guard.step(nonfinite(loss, norm))
    opt.zero_grad(set_to_none=True)


def _state(model, opt):
    tensors = {f"m.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, s in enumerate(opt.state.values()):
        tensors.update({f"o{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return tensors


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad_at", [0, 2])  # the very first step (state created by a skipped step) and a later one
def test_skipped_update_changes_nothing_and_the_run_goes_on_as_without_it(name, bad_at):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(5)]
    poisoned = [(x * float("nan"), y) if i == bad_at else (x, y) for i, (x, y) in enumerate(batches)]

    model, twin = _model(), _model()
    opt, twin_opt = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](twin.parameters())
    guard, twin_guard = NonFiniteGuard(opt, model=model), NonFiniteGuard(twin_opt, model=twin)
    assert guard.mode == ("found_inf" if name == "adamw_fused" else "snapshot")
    assert honours_found_inf(opt) == (name == "adamw_fused")
    for i, (x, y) in enumerate(poisoned):
        before = _state(model, opt)
        _step(model, opt, guard, x, y)
        if i == bad_at:
            after = _state(model, opt)
            for k, v in before.items():  # weights, moments, step counters, BN statistics: all as before
                assert torch.equal(after[k], v), k
            if bad_at == 0:  # state made by the skipped first step is zero, as if never stepped
                assert all(torch.count_nonzero(v) == 0 for k, v in after.items() if k.startswith("o"))
    for i, (x, y) in enumerate(batches):
        if i != bad_at:
            _step(twin, twin_opt, twin_guard, x, y)
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_nonfinite_flags_nan_and_inf_only():
    assert not nonfinite(torch.tensor(1.0), torch.tensor([2.0, -3.0]))
    assert nonfinite(torch.tensor(float("nan")), torch.tensor(0.0))
    assert nonfinite(torch.tensor(0.0), torch.tensor([1.0, float("-inf")]))
