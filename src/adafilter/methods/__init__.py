"""Fine-tuning methods: AdaFilter, its ablations and the paper's baselines (Table 2-4).

A :class:`Method` says how to turn a backbone into the model that trains (:meth:`Method.build`),
which parameters train with which learning rate (:meth:`Method.param_groups`), what extra loss
it adds (``Prepared.regularizer``) and whether it has per-example policies. Methods are small
frozen dataclasses registered in :data:`METHODS`; the engine never branches on a method name.

=================  ===========================================================================
``adafilter``      recurrent (LSTM) gate + gated BN: the paper's method
``finetune``       standard fine-tuning of every parameter
``finetune-half``  freeze the first ``floor(n/2)`` convs (execution order) and their BNs
``random-policy``  AdaFilter with Bernoulli(``random_p``) policies (train and eval), no gate
``l2sp``           fine-tuning + L2-SP penalty (Li et al. 2018), no weight decay
``standard-bn``    AdaFilter with one standard BN after the selection (Table 3)
``cnn-gate``       AdaFilter whose policy comes from a CNN that sees the image (Table 4)
``linear-probe``   only the new head trains on the frozen backbone (a reference line)
=================  ===========================================================================
"""

from __future__ import annotations

from ..tuner import conv_execution_order
from ..utils.registry import Registry
from ..utils.seeding import derive_seed
from .adafilter import AdaFilterMethod, PolicyCost, trainable_per_example
from .base import Method, Prepared
from .finetune import FineTune, FineTuneHalf, LinearProbe, freeze_backbone, freeze_first_half
from .l2sp import L2SP, L2SPRegularizer

__all__ = [
    "METHODS",
    "AdaFilterMethod",
    "FineTune",
    "FineTuneHalf",
    "L2SP",
    "L2SPRegularizer",
    "LinearProbe",
    "Method",
    "PolicyCost",
    "Prepared",
    "conv_execution_order",
    "derive_seed",
    "freeze_backbone",
    "freeze_first_half",
    "trainable_per_example",
]


METHODS: Registry[Method] = Registry("method")
METHODS.add(
    "adafilter",
    AdaFilterMethod(
        "adafilter", "AdaFilter: recurrent (LSTM) gate + gated BN (the paper's method)"
    ),
)
METHODS.add("finetune", FineTune("finetune", "standard fine-tuning of all parameters"))
METHODS.add(
    "finetune-half",
    FineTuneHalf(
        "finetune-half", "freeze the first half of the convs (execution order) and their BNs"
    ),
)
METHODS.add(
    "random-policy",
    AdaFilterMethod(
        "random-policy",
        "AdaFilter with random Bernoulli(0.5) policies, no gate",
        policy="random",
        trains_gate=False,
    ),
)
METHODS.add(
    "adafilter-all-f",
    AdaFilterMethod(
        "adafilter-all-f",
        "AdaFilter with every filter forced to F, no gate: equals fine-tuning (a check)",
        policy="finetuned",
        trains_gate=False,
    ),
)
METHODS.add(
    "linear-probe",
    LinearProbe("linear-probe", "only the new head trains on the frozen backbone (reference)"),
)
METHODS.add("l2sp", L2SP("l2sp", "fine-tuning with the L2-SP penalty (alpha=beta=0.01)"))
METHODS.add(
    "standard-bn",
    AdaFilterMethod(
        "standard-bn",
        "AdaFilter with one standard BN instead of gated BN (Table 3)",
        overrides={"gated_bn": False},
    ),
)
METHODS.add(
    "cnn-gate",
    AdaFilterMethod(
        "cnn-gate",
        "AdaFilter whose policy comes from a separate CNN on the image (Table 4)",
        overrides={"gate": "cnn"},
    ),
)
