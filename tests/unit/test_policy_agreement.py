"""``benchmarks/policy_agreement.py``: the cross-seed statistics that tell a learned policy from
one that follows the gate's initialisation."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import policy_agreement  # noqa: E402  (benchmarks/ is not a package)


def _run(final: list[torch.Tensor], init: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    return {"final": final, "init": init}


def _shares(gen: torch.Generator, sizes: list[int], shift: list[float]) -> list[torch.Tensor]:
    return [
        (torch.rand(c, generator=gen) + s).clamp(0, 1) for c, s in zip(sizes, shift, strict=True)
    ]


def test_learned_policy_agrees_across_seeds_and_random_inits_do_not() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [64] * 12
    learned = _shares(gen, sizes, [(-0.3 if i % 2 else 0.3) for i in range(12)])
    runs = [_run(learned, _shares(gen, sizes, [0.0] * 12)) for _ in range(3)]
    out = policy_agreement.compare(runs)
    assert out["layer_corr"]["final"] == [1.0, 1.0, 1.0]  # 3 pairs, same final policy
    assert out["filter_majority_agree"]["final"] == [1.0, 1.0, 1.0]
    assert all(abs(c) < 0.2 for c in out["filter_corr"]["init"])  # independent draws
    assert all(abs(a - 0.5) < 0.06 for a in out["filter_majority_agree"]["init"])
    assert len(out["filter_corr"]["final_vs_init"]) == 3  # one per run


@pytest.mark.parametrize(
    ("a", "b", "agree", "chance"),
    [
        ([0.9, 0.9, 0.1, 0.1], [0.9, 0.1, 0.9, 0.1], 0.5, 0.5),
        ([0.9, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.1], 0.75, 0.75),
    ],
)
def test_majority_agreement_and_its_chance_level(a, b, agree, chance) -> None:
    got = policy_agreement._agree(torch.tensor(a), torch.tensor(b))
    assert got == pytest.approx((agree, chance))


def test_filter_shares_of_a_wrapped_model() -> None:
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from adafilter import wrap
    from helpers import conv_bn_relu6

    torch.manual_seed(0)
    net = nn.Sequential(
        conv_bn_relu6(3, 8, 3),
        conv_bn_relu6(8, 16, 3, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    model = wrap(net, example_input=torch.zeros(1, 3, 16, 16))
    data = TensorDataset(torch.randn(6, 3, 16, 16), torch.zeros(6, dtype=torch.long))
    shares = policy_agreement.filter_shares(model, DataLoader(data, batch_size=4))
    assert [s.shape[0] for s in shares] == [8, 16]
    assert all(bool(((s >= 0) & (s <= 1)).all()) for s in shares)
    model(data.tensors[0])  # all six in one batch: eval policies are per example
    for s, pol in zip(shares, model.policies.values(), strict=True):
        torch.testing.assert_close(s, pol.float().mean(0))
