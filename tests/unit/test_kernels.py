"""Triton kernels (layers/kernels/) -- the gated BN forward and backward, the gate's eval
step -- against the eager paths they replace on CUDA.

On CPU they run through Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before
Triton is imported: a subprocess); skipped where Triton or its interpreter is unavailable. On
a CUDA machine the same comparison runs on the GPU. Tolerance: ``atol=1e-5, rtol=1e-4``
(float32; the kernels sum in another order than ATen).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adafilter import AdaFilterConfig, wrap
from adafilter.layers import cpu_gate, kernels
from adafilter.layers.gate import RecurrentGate
from adafilter.layers.gated_bn import gated_batch_norm

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _bns(
    c: int, device: str, momentum: float | None = 0.1
) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    gen = torch.Generator().manual_seed(1)
    bn_f, bn_s = nn.BatchNorm2d(c, momentum=momentum), nn.BatchNorm2d(c, eps=1e-3)
    with torch.no_grad():
        for bn in (bn_f, bn_s):
            bn.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(c, generator=gen))
            bn.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return bn_f.to(device), bn_s.to(device)


def _run(
    device: str, training: bool, routing: str = "mixed", momentum: float | None = 0.1
) -> tuple[torch.Tensor, list]:
    """Gated BN on a batch with degenerate, whole and mixed channels (``routing="mixed"``), or
    one example routed wholly to F / to S (a standard BN by the whole-branch rule, though
    below ``min_examples``): output, grads, BN state. In ``"mixed"`` the degenerate F channel
    stores a variance of 0 (it must normalise with 1, not divide by ``sqrt(eps)``).
    ``momentum=None`` (a cumulative average in BN_F) keeps the eager statistics before the
    kernels' backward."""
    gen = torch.Generator().manual_seed(0)
    b, c, h, w = (5, 6, 3, 3) if routing == "mixed" else (1, 6, 3, 3)
    xf = torch.randn(b, c, h, w, generator=gen).to(device).requires_grad_(True)
    xs = (torch.randn(b, c, h, w, generator=gen) + 1).to(device).requires_grad_(True)
    g = (torch.rand(b, c, generator=gen) > 0.5).float()
    if routing == "mixed":
        g[:, 0] = 1.0  # all F
        g[:, 1] = 0.0
        g[0, 1] = 1.0  # one example in F: running statistics (too few examples)
    else:
        g.fill_(1.0 if routing == "all_f" else 0.0)
    g = g.to(device).requires_grad_(True)
    bn_f, bn_s = _bns(c, device, momentum)
    if routing == "mixed":
        with torch.no_grad():  # a stored variance of 0 where the lone F example normalises
            bn_f.running_var[1] = 0.0
    out = gated_batch_norm(xf, xs, g, bn_f, bn_s, training=training)
    weight = torch.linspace(-1, 2, out.numel(), device=device).view_as(out)
    (out * weight).sum().backward()
    grads = [xf.grad, xs.grad, g.grad] + [p.grad for bn in (bn_f, bn_s) for p in bn.parameters()]
    state = [t.clone() for bn in (bn_f, bn_s) for t in bn.buffers()]  # running stats, batches
    return out.detach(), [t for t in grads + state if t is not None]


def compare(device: str) -> None:
    """Kernels on vs off: same outputs, gradients and running statistics (train and eval)."""
    assert kernels.available(torch.zeros(1, device=device)), "kernels not used"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first-use check passes, silently
        assert kernels._smoke(torch.device(device))
    gen = torch.Generator().manual_seed(2)
    xf, xs = (torch.randn(2, 3, 5, 7, generator=gen).to(device) for _ in range(2))
    sel = (torch.rand(2, 3, generator=gen) > 0.5).to(device)
    z = torch.where(sel[:, :, None, None], xf, xs)
    var, mean = torch.var_mean(z, dim=(2, 3), correction=0)
    got_mean, got_var = kernels.plane_stats(xf, xs, sel)
    torch.testing.assert_close(got_mean, mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_var, var, atol=1e-5, rtol=1e-4)
    scale, shift = (torch.randn(2, 3, generator=gen).to(device) for _ in range(2))  # (2, C)
    got = kernels.select_affine(xf, xs, sel, scale, shift)
    pick = sel[:, :, None, None]
    want = z * torch.where(pick, scale[0, :, None, None], scale[1, :, None, None])
    want += torch.where(pick, shift[0, :, None, None], shift[1, :, None, None])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(kernels.select_affine(xf, xs, sel.float(), scale, shift), want)
    dy = torch.randn(2, 3, 5, 7, generator=gen).to(device)
    a, p = kernels.plane_sums(dy, xf, xs)
    torch.testing.assert_close(a, dy.sum((2, 3)), atol=1e-5, rtol=1e-4)
    want = torch.stack([(dy * x).sum((2, 3)) for x in (xf, xs)])
    torch.testing.assert_close(p, want, atol=1e-5, rtol=1e-4)
    k = torch.randn(3, 2, 2, 3, generator=gen).to(device)  # k1, k2, k3 of F and S
    got_f, got_s = kernels.branch_grads(dy, xf, xs, sel, k)
    for r, (got_x, x, routed) in enumerate(((got_f, xf, sel), (got_s, xs, ~sel))):
        k1, k2, k3 = (k[j, r][:, :, None, None] for j in range(3))
        want_x = torch.where(routed[:, :, None, None], k1 * dy + k2 * x + k3, 0.0)
        torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-4)
    _compare_gate_step(device, gen)
    for detach, shared, binary in ((True, False, False), (False, True, True), (True, True, False)):
        _compare_gate_train(device, gen, detach, shared, binary)
    _compare_model_step(device)
    cases = [(True, "mixed", 0.1), (True, "all_f", 0.1), (True, "all_s", 0.1)]
    cases += [(True, "mixed", None), (False, "mixed", 0.1)]
    for training, routing, momentum in cases:
        kernels.ENABLED = True
        out_k, rest_k = _run(device, training, routing, momentum)
        kernels.ENABLED = False
        out_e, rest_e = _run(device, training, routing, momentum)
        kernels.ENABLED = True
        torch.testing.assert_close(out_k, out_e, atol=1e-5, rtol=1e-4)
        assert len(rest_k) == len(rest_e)
        for a, b in zip(rest_k, rest_e, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _compare_gate_step(device: str, gen: torch.Generator) -> None:
    """The gate's eval step kernel against the ATen step: embedding folded into the input
    map or not, C_in and C_out over one block, batch 1 and 3, first step and with state."""
    gate = RecurrentGate([8, 300, 12], [16, 70, 40], embed_dim=6, hidden_dim=5).eval()
    gate = gate.to(device)
    assert gate._eval_weights(0).emb is None and gate._eval_weights(1).emb is not None
    for batch in (1, 3):
        state_k = state_e = None
        for i, c in enumerate((8, 300, 12)):
            x = torch.randn(batch, c, 5, 4, generator=gen).to(device)
            with torch.no_grad():
                logits_k, state_k = kernels.gate_step(x, *gate._eval_weights(i), state_k)
                kernels.ENABLED, cpu_gate.ENABLED = False, False
                logits_e, state_e = gate._step_eval(i, x, state_e)
                kernels.ENABLED, cpu_gate.ENABLED = True, True
            for got, want in zip((logits_k, *state_k), (logits_e, *state_e), strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _compare_gate_train(
    device: str, gen: torch.Generator, detach_input: bool, shared: bool, binary: bool
) -> None:
    """The training step's kernels (forward and backward) against the ATen step and autograd:
    three layers (C_in and C_out over one block), the state carried, the last layer's state
    used by the loss too; outputs, states and the gradient of every gate parameter (and of
    the input, where the gate's gradient reaches it). ``shared``: one packed LSTM for the
    three steps (as a forward passes it), else packed per step; ``binary``: the step returns
    the thresholded policy (identity straight-through)."""
    torch.manual_seed(5)
    gate = RecurrentGate([8, 300, 12], [16, 70, 40], embed_dim=6, hidden_dim=5)
    gate.detach_input = detach_input
    gates = {on: copy.deepcopy(gate).to(device).train() for on in (True, False)}
    xs = [torch.randn(3, c, 5, 4, generator=gen).to(device) for c in (8, 300, 12)]
    results = {}
    for on, g in gates.items():
        kernels.ENABLED = on
        inputs = [x.clone().requires_grad_(True) for x in xs]
        packed = g.packed_cell(inputs[0]) if shared else None
        assert (packed is not None) == (shared and on)
        state, loss = None, 0.0
        outs = []
        for i, x in enumerate(inputs):
            out, state = g.step(i, x, state, packed=packed, binary=binary)
            w = torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
            loss = loss + (out * w).sum()
            outs += [out.detach(), *(s.detach() for s in state)]
        (loss + state[0].sum() + 2 * state[1].sum()).backward()
        grads = [p.grad for p in g.parameters() if p.grad is not None]
        if not detach_input:
            grads += [x.grad for x in inputs]
        results[on] = (outs, grads, sum(p.grad is not None for p in g.parameters()))
    kernels.ENABLED = True
    assert results[True][2] == results[False][2]  # the same parameters received gradients
    got, want = results[True][0] + results[True][1], results[False][0] + results[False][1]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if binary:
        assert set(results[True][0][0].unique().tolist()) <= {0.0, 1.0}


def tiny_net() -> nn.Module:
    """Two conv-BN-ReLU layers and a head: 3 x 8 x 8 inputs, 5 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )  # fmt: skip


def _compare_model_step(device: str) -> None:
    """A wrapped network's training step, kernels on vs off: the gate's steps share one
    packed LSTM and return the thresholded policy; every parameter's gradient and the BNs'
    buffers agree."""
    torch.manual_seed(3)
    x = torch.randn(4, 3, 8, 8)
    cfg = AdaFilterConfig(gate_bias_init=0.0)
    model = wrap(tiny_net(), cfg, example_input=x).to(device).train()
    x = x.to(device)
    results = []
    for on in (True, False):
        kernels.ENABLED = on
        m = copy.deepcopy(model)
        out = m(x)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        assert all(t is not None for t in grads)
        results.append([out.detach(), *grads, *m.buffers()])
    kernels.ENABLED = True
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def compare_small(device: str) -> None:
    """One gated BN training step (degenerate, whole-branch and mixed channels), kernels on
    vs off: output, every gradient and the running statistics; the kernels must have run."""
    assert kernels.available(torch.zeros(1, device=device)), "kernels not used"
    ran: list[str] = []
    real = kernels.select_affine
    kernels.select_affine = lambda *a, **k: ran.append("select_affine") or real(*a, **k)
    out_k, rest_k = _run(device, True, "mixed", 0.1)
    kernels.select_affine = real
    kernels.ENABLED = False
    out_e, rest_e = _run(device, True, "mixed", 0.1)
    kernels.ENABLED = True
    assert ran, "the Triton passes did not run"
    torch.testing.assert_close(out_k, out_e, atol=1e-5, rtol=1e-4)
    assert len(rest_k) == len(rest_e)
    for a, b in zip(rest_k, rest_e, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    print("equal to eager")


def _kernel_names() -> set[str]:
    """Every Triton kernel (``*_kernel``) of the kernels package's modules."""
    import pkgutil

    mods = [
        importlib.import_module(f"{kernels.__name__}.{m.name}")
        for m in pkgutil.iter_modules(kernels.__path__)
    ]
    return {n for m in mods for n in dir(m) if n.endswith("_kernel")}


def _in_subprocess(call: str, **env: str) -> str:
    """Run ``test_kernels.<call>`` in a fresh interpreter with ``env`` (Triton reads its mode
    at import); its stdout. The interpreter mode skips where it cannot be imported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if env.get("TRITON_INTERPRET") == "1":
        probe = "import triton.language; from adafilter.layers import kernels; print('ok')"
        if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode:
            pytest.skip("Triton's interpreter cannot be imported here")
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_kernels as t; t.{call}"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_a_gated_bn_step_matches_eager_under_triton_interpreter() -> None:
    """The default tier's Triton case (seconds): one gated BN step against eager."""
    assert "equal to eager" in _in_subprocess("compare_small('cpu')", TRITON_INTERPRET="1")


@pytest.mark.slow  # the interpreter runs each program in Python (~30 s of CPU here)
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernels_match_eager_under_triton_interpreter() -> None:
    _in_subprocess("compare('cpu')", TRITON_INTERPRET="1")


def _kernel_outputs() -> list[torch.Tensor]:
    """Everything the kernels write, on inputs that give several programs along every grid
    axis: the gated BN's training forward and backward on 3 x 40 planes of 37 x 37 values (two
    blocks each, one plane a program; two 32-channel blocks) and of 5 x 5 values (32 planes a
    program), the gate's eval step and training step (3 layers, state carried, backward)."""
    gen = torch.Generator().manual_seed(7)
    outs = []
    for size in (37, 5):
        xf = torch.randn(3, 40, size, size, generator=gen).requires_grad_(True)
        xs = (torch.randn(3, 40, size, size, generator=gen) + 1).requires_grad_(True)
        g = (torch.rand(3, 40, generator=gen) > 0.5).float().requires_grad_(True)
        bn_f, bn_s = _bns(40, "cpu")
        out = gated_batch_norm(xf, xs, g, bn_f, bn_s, training=True, capturable=True)
        (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
        outs += [out, xf.grad, xs.grad, g.grad]
        outs += [t for bn in (bn_f, bn_s) for t in (*bn.buffers(), bn.weight.grad, bn.bias.grad)]
    torch.manual_seed(5)
    gate = RecurrentGate([8, 300, 12], [16, 70, 40], embed_dim=6, hidden_dim=5)
    inputs = [torch.randn(3, c, 5, 4, generator=gen).requires_grad_(True) for c in (8, 300, 12)]
    packed, state, loss = gate.packed_cell(inputs[0]), None, 0.0
    for i, x in enumerate(inputs):
        logits, state = gate.step(i, x, state, packed=packed)
        loss = loss + (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum()
        outs += [logits, *state]
    (loss + state[0].sum()).backward()
    outs += [p.grad for p in gate.parameters() if p.grad is not None]
    outs += [x.grad for x in inputs if x.grad is not None]
    gate.eval()
    with torch.no_grad():
        state = None
        for i, x in enumerate(inputs):
            logits, state = kernels.gate_step(x, *gate._eval_weights(i), state)
            outs += [logits, *state]
    return [t.detach() for t in outs]


class _ProgramOrder:
    """Run the interpreter's programs in another order: each (x, y, z) the grid loop visits
    is handed a permuted program id, as a GPU may schedule them. ``moved`` counts the ids
    that changed (proof the patch took effect)."""

    def __init__(self, order: str) -> None:
        from triton.runtime import interpreter

        self.builder, self.order, self.dims, self.moved = (
            interpreter.interpreter_builder,
            order,
            (1, 1, 1),
            0,
        )
        self.grid = interpreter.GridExecutor
        self.kernel, self.kernels_moved = "", set()

    def _set_dim(self, x: int, y: int, z: int) -> None:
        self.dims = (x, y, z)
        type(self.builder).set_grid_dim(self.builder, x, y, z)

    def _set_idx(self, x: int, y: int, z: int) -> None:
        _, ny, nz = self.dims
        n, flat = self.dims[0] * ny * nz, (x * ny + y) * nz + z
        if self.order == "reversed":
            to = n - 1 - flat
        else:  # a fixed pseudo-random permutation of the n programs (never the identity)
            perm = random.Random(n).sample(range(n), n)
            to = (perm if perm != sorted(perm) else perm[::-1])[flat]
        self.moved += to != flat
        if to != flat:
            self.kernels_moved.add(self.kernel)
        type(self.builder).set_grid_idx(self.builder, to // (ny * nz), to // nz % ny, to % nz)

    def __enter__(self) -> _ProgramOrder:
        self.builder.set_grid_dim, self.builder.set_grid_idx = self._set_dim, self._set_idx
        call = self.run = self.grid.__call__

        def named(executor: Any, *args: Any, **kwargs: Any) -> None:
            self.kernel = executor.fn.__name__
            call(executor, *args, **kwargs)

        self.grid.__call__ = named
        return self

    def __exit__(self, *exc: object) -> None:
        del self.builder.set_grid_dim, self.builder.set_grid_idx
        self.grid.__call__ = self.run


def program_order_check() -> None:
    """The kernels' results do not depend on the order their programs run in (bit for bit):
    no program reads what another writes. The interpreter runs programs one after another in
    id order, which hides exactly the races a GPU would expose."""
    assert kernels.interpreted()
    want = _kernel_outputs()
    for order in ("reversed", "shuffled"):
        with _ProgramOrder(order) as patch:
            got = _kernel_outputs()
        names = _kernel_names()
        assert patch.kernels_moved == names, (order, names - patch.kernels_moved)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(a, b), (order, i, (a - b).abs().max().item())
    print(f"{len(want)} tensors, bit-identical in reversed and shuffled program order")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernels_do_not_depend_on_program_order() -> None:
    assert "bit-identical" in _in_subprocess("program_order_check()", TRITON_INTERPRET="1")


_SIG_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.bool: "i1",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
}


def _recorded_launches() -> list[tuple[Any, dict[str, str], dict[str, Any]]]:
    """Every kernel variant the wrappers launch (each flag combination), recorded instead of
    run: ``(kernel, Triton signature, constexprs)``. Patches ``JITFunction.run``: call only in
    a subprocess."""
    from triton.runtime.jit import JITFunction

    calls: list[tuple[Any, tuple, dict]] = []
    JITFunction.run = lambda self, *a, grid, warmup, **kw: calls.append((self, a, kw))
    sel = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    # planes of 16 and 1024 values (the largest block; 8 and 1 planes to a program),
    # activations in float32 and, under autocast, in half precision
    for size, dtype in ((4, torch.float32), *((32, d) for d in _SIG_DTYPES if d.is_floating_point)):
        x = torch.randn(2, 3, size, size).to(dtype)
        for s in (sel, sel > 0.5):  # the policy as 0./1. floats and as bools
            kernels.plane_stats(x, x, s)
            kernels.select_affine(x, x, s, torch.ones(2, 3), torch.ones(2, 3))
            kernels.branch_grads(x, x, x, s, torch.zeros(3, 2, 2, 3))
        kernels.plane_sums(x, x, x)
        if dtype != torch.float32:  # the gate's pooled input under autocast
            emb, cell, head = nn.Linear(3, 2), nn.LSTMCell(2, 2), nn.Linear(2, 3)
            packed = kernels.pack_cell(cell).detach()
            kernels.gate_train_forward(sel.to(dtype), None, emb, packed, head, threshold=True)
    x, s = torch.randn(2, 64, 7, 7), torch.rand(2, 64) > 0.5  # full tiles: 16 planes of 7 x 7
    kernels.plane_stats(x, x, s)
    kernels.select_affine(x, x, s, torch.ones(2, 64), torch.ones(2, 64))
    kernels.plane_sums(x, x, x)
    kernels.branch_grads(x, x, x, s, torch.zeros(3, 2, 2, 64))
    bns = (nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    kernels.branch_stats(sel, sel, sel, 16, bns, min_examples=2, min_values=16)
    use = torch.ones(2, 3, dtype=torch.bool)
    kernels.branch_coeffs(sel, torch.zeros(5, 2, 3), use, sel, torch.zeros(2, 2, 3))
    w = [torch.zeros(s) for s in ((3, 8), (8,), (2, 8), (2, 3), (3,))]
    ones, x = torch.ones(2, 2), torch.randn(2, 3, 4, 4)
    kernels.gate_step(x, None, None, *w, None)
    kernels.gate_step(x, torch.zeros(3, 3), w[4], *w, (ones, ones))
    emb, cell, head = nn.Linear(3, 2), nn.LSTMCell(2, 2), nn.Linear(2, 3)
    packed = kernels.pack_cell(cell).detach()
    for state in (None, (ones, ones)):
        for threshold in (False, True):
            kernels.gate_train_forward(sel, state, emb, packed, head, threshold=threshold)
        c0 = None if state is None else ones
        for need in (False, True):
            grads = (torch.zeros(2, 3), ones, ones)
            kernels.gate_train_backward(
                grads, torch.zeros(2, 8), ones, c0, emb, packed, head, need_pooled=need
            )
    variants = {}
    for kernel, args, kwargs in calls:
        bound = inspect.signature(kernel.fn).bind(*args, **kwargs).arguments
        sig, constexprs = {}, {}
        for p in kernel.params:
            v = bound[p.name]
            if p.is_constexpr:
                sig[p.name], constexprs[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + _SIG_DTYPES[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            else:
                sig[p.name] = {int: "i32", float: "fp32"}[type(v)]
        key = (kernel.fn.__name__, *sorted(sig.items()), *sorted(constexprs.items()))
        variants[key] = (kernel, sig, constexprs)
    return list(variants.values())


def compile_for_cuda(capabilities: tuple[int, ...]) -> None:
    """Compile every kernel variant to a cubin for these compute capabilities (no GPU needed:
    Triton's compiler and ptxas), which the interpreter never does: it runs the Python."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = _recorded_launches()
    names = {k.fn.__name__ for k, _, _ in launches}
    assert names == _kernel_names(), names  # every kernel
    for cap in capabilities:
        for kernel, sig, constexprs in launches:
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
            out = triton.compile(src, target=GPUTarget("cuda", cap, 32))
            assert out.asm["cubin"], (kernel.fn.__name__, cap)
    print(f"{len(launches)} variants of {len(names)} kernels for {capabilities}")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernels_compile_for_cuda_without_a_gpu(tmp_path: Path) -> None:
    """Every kernel, in every flag combination and activation dtype the wrappers launch,
    compiles to a cubin for an A100 (sm_80) and an H100 (sm_90); a fresh cache, so nothing
    is reused. Catches what the interpreter accepts (e.g. a loop-carried variable that changes
    type: checked)."""
    out = _in_subprocess(
        "compile_for_cuda((80, 90))", TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path)
    )
    assert "variants of 8 kernels" in out


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA + Triton")
def test_kernels_match_eager_on_cuda() -> None:
    compare("cuda")


def test_kernels_reject_bad_shapes() -> None:
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="need xf, xs"):
        kernels.plane_stats(x, x, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="need dy, xf, xs"):
        kernels.plane_sums(x[:1], x, x)
    with pytest.raises(ValueError, match="k \\(3, 2, 2, 3\\)"):
        kernels.branch_grads(x, x, x, torch.zeros(2, 3, dtype=torch.bool), torch.zeros(3, 2, 2))
    sel = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="scale, shift \\(2, 3\\)"):
        kernels.select_affine(x, x, sel, torch.zeros(2, 3), torch.zeros(2, 2))  # (B, C) shift
    bns = (nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="of the BNs' 3 channels"):
        kernels.branch_stats(sel, sel, sel[:1], 16, bns, min_examples=2, min_values=16)
    bns[0].momentum = None
    with pytest.raises(ValueError, match="running statistics and momentum"):
        kernels.branch_stats(sel, sel, sel, 16, bns, min_examples=2, min_values=16)
    with pytest.raises(ValueError, match="stats \\(5, 2, C\\)"):
        kernels.branch_coeffs(sel, torch.zeros(4, 2, 3), sel.bool()[:1], sel, torch.zeros(2, 2, 3))
    w = RecurrentGate([4], [6], embed_dim=3, hidden_dim=2).eval()._eval_weights(0)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.gate_step(torch.zeros(1, 5, 2, 2), *w, None)  # 5 channels, the gate takes 4


def test_kernels_off_on_cpu_without_interpreter() -> None:
    if kernels.interpreted():
        pytest.skip("TRITON_INTERPRET=1 is set in this process")
    assert not kernels.available(torch.zeros(1))


def test_kernels_checked_once_per_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first eager call on a CUDA device runs the smoke check, once; a CUDA-graph capture
    neither runs it nor remembers an answer."""
    calls: list[torch.device] = []
    monkeypatch.setattr(kernels, "_smoke", lambda d: calls.append(d) or d.index == 0)
    monkeypatch.setattr(kernels, "_VERIFIED", {})
    capturing = [True]
    monkeypatch.setattr(kernels, "_capturing", lambda: capturing[0])
    assert kernels._works_on(torch.device("cuda", 0)) and calls == []
    capturing[0] = False
    for _ in range(3):
        assert kernels._works_on(torch.device("cuda", 0))
        assert not kernels._works_on(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_failing_kernels_turn_themselves_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that cannot compile (or computes nonsense) on a device: one warning naming the
    cause, and ``False`` -- the eager path runs instead of the step failing."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(kernels, "plane_stats", broken)
    with pytest.warns(RuntimeWarning, match="PassManager::run failed.*eager path runs"):
        assert not kernels._smoke(torch.device("cpu"))
