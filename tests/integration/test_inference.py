"""Using a trained run: ``adafilter.load``, ``adafilter predict``, ``adafilter export``.

Runs are the tiny ones of ``conftest.tiny`` (``tiny-cnn`` on a generated 16 px ImageFolder,
one epoch). A "mixed" copy of the AdaFilter checkpoint gets random gate-head biases, so its
policies take some filters from F and some from S and the selection itself is exercised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import adafilter
from adafilter.checkpoint import save_checkpoint
from adafilter.cli import main
from adafilter.errors import CheckpointError
from adafilter.layers.gated_conv import GatedConv2dBN
from helpers import one_line_error, run_in_threads, train_args

CLASSES = ["cat", "dog"]


@pytest.fixture(scope="module")
def runs(tiny: dict) -> dict[str, Path]:
    base, data = tiny["base"], tiny["data"]
    paths = {"data": data}
    for method in ("adafilter", "finetune"):
        paths[method] = base / method
        assert main(train_args(data, paths[method], method, "--epochs", "1", "--quiet")) == 0
    ckpt = torch.load(paths["adafilter"] / "checkpoint.pt", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for key, value in ckpt["model"].items():
        if key.startswith("gate.heads.") and key.endswith(".bias"):
            value.copy_(torch.randn(value.shape, generator=gen) * 3)
    (base / "mixed").mkdir()
    paths["mixed"] = base / "mixed" / "checkpoint.pt"
    save_checkpoint(paths["mixed"], {k: v for k, v in ckpt.items() if k not in ("format",)})
    return paths


def val_images(data: Path) -> list[tuple[Path, int]]:
    return [(p, i) for i, c in enumerate(CLASSES) for p in sorted((data / "val" / c).glob("*.png"))]


def batch(run: adafilter.LoadedRun, data: Path) -> torch.Tensor:
    return torch.stack([run.transform(Image.open(p)) for p, _ in val_images(data)])


def eval_json(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


# ---- load ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["adafilter", "finetune"])
def test_load_reproduces_eval(
    runs: dict[str, Path], method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = adafilter.load(runs[method])  # the run directory
    assert not run.model.training and run.kind == "checkpoint" and run.method == method
    assert run.class_names == CLASSES and run.backbone == "tiny-cnn" and run.resolution == 16
    assert run.source == runs[method] / "checkpoint.pt" and run.epoch == 1
    if method == "adafilter":
        assert isinstance(run.model, adafilter.AdaFilterModel) and run.has_policies
        assert isinstance(run.adafilter_config, adafilter.AdaFilterConfig)
        assert run.gated_layers == ["conv1", "conv2", "conv3"]
    else:  # a fine-tuned baseline comes back as the plain network
        assert not isinstance(run.model, adafilter.AdaFilterModel)
        assert run.adafilter_config is None and not run.has_policies

    images = val_images(runs["data"])
    preds = [run.predict(p, top_k=2) for p, _ in images]  # batch 1 each
    hits = [pr.indices[0] == y for pr, (_, y) in zip(preds, images, strict=True)]
    acc = 100.0 * sum(hits) / len(images)
    result = eval_json(runs[method] / "checkpoint.pt", capsys)
    assert acc == result["test_acc"] == run.test_acc
    with torch.no_grad():  # the batched forward agrees with the batch-1 predictions
        probs = run.model(batch(run, runs["data"])).softmax(1)
    assert [pr.indices[0] for pr in preds] == probs.argmax(1).tolist()
    top = torch.tensor([pr.top_k[0][1] for pr in preds])
    torch.testing.assert_close(top, probs.max(1).values, atol=1e-5, rtol=0)
    again = adafilter.load(runs[method] / "checkpoint.pt", device="cpu")
    assert again.predict(images[0][0]).top_k == preds[0].top_k


def test_predict_runs_the_batch1_fast_path(
    runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = adafilter.load(runs["mixed"])
    seen: list[tuple[int, bool]] = []
    fast = GatedConv2dBN._forward_fast

    def spy(self: GatedConv2dBN, x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        seen.append((x.shape[0], torch.is_inference_mode_enabled()))
        return fast(self, x, sel)

    monkeypatch.setattr(GatedConv2dBN, "_forward_fast", spy)
    path = val_images(runs["data"])[0][0]
    pred = run.predict(Image.open(path))
    assert seen == [(1, True)] * 3
    assert set(pred.policy or {}) == {"conv1", "conv2", "conv3"}
    # The mixed gate routes some filters to S: the per-image policy is not all-F.
    assert any(0.0 <= v < 1.0 for v in pred.policy.values())
    with torch.no_grad():  # the inference-mode caches do not break a later ordinary forward
        x = run.transform(Image.open(path))[None]
        logits = run.model(x)
    torch.testing.assert_close(logits.softmax(1)[0].max().item(), pred.top_k[0][1])


def test_predict_is_thread_safe(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads predicting at once on one LoadedRun each get their own image's prediction
    and policy (the policy comes back with the forward, not from the model's last state)."""
    run = adafilter.load(runs["mixed"])
    with torch.no_grad():  # policies that depend on the image
        for head in run.model.gate.heads:
            head.weight.mul_(30)
            head.bias.zero_()
    images = [Image.open(p).convert("RGB") for p, _ in val_images(runs["data"])]
    want = [run.predict(img, top_k=2) for img in images]
    assert len({tuple(w.policy.values()) for w in want}) > 1  # images differ in policy
    # another forward landing between a call's forward and its policy read changes nothing
    real = adafilter.AdaFilterModel.forward_with_policies
    other = run.transform(images[-1])[None]

    def interleaved(self: adafilter.AdaFilterModel, x: torch.Tensor) -> object:
        out = real(self, x)
        real(self, other)  # as another thread would
        return out

    with monkeypatch.context() as mp:
        mp.setattr(adafilter.AdaFilterModel, "forward_with_policies", interleaved)
        assert run.predict(images[0], top_k=2).policy == want[0].policy != want[-1].policy
    wrong: list[int] = []

    def work(k: int) -> None:
        for r in range(3 * len(images)):
            i = (k + r) % len(images)
            got = run.predict(images[i], top_k=2)
            if got.policy != want[i].policy or got.indices != want[i].indices:
                wrong.append(i)

    run_in_threads(work)
    assert not wrong


def test_predict_keeps_the_merged_filters_across_calls(runs: dict[str, Path]) -> None:
    """The batch-1 merged filter banks made by the first call serve the next calls (only the
    filters whose decision changed are recopied); a model left training is put in eval."""
    run = adafilter.load(runs["mixed"])
    layers = list(run.model.gated_layers().values())
    paths = [p for p, _ in val_images(runs["data"])]
    run.predict(paths[0])
    banks = [layer._merged for layer in layers]
    assert all(b is not None for b in banks)
    run.predict(paths[1])
    list(run.predict_files(paths[2:4]))
    assert all(layer._merged is b for layer, b in zip(layers, banks, strict=True))  # kept
    run.model.train()
    run.predict(paths[0])
    assert not run.model.training
    assert not any(layer._merged is b for layer, b in zip(layers, banks, strict=True))


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA present but unused by this process: any read or write of its RNG state, or its
    initialisation, fails the test."""

    def touched(*args: object, **kwargs: object) -> None:
        pytest.fail("CPU work touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for name in ("get_rng_state_all", "set_rng_state_all", "get_rng_state", "set_rng_state"):
        monkeypatch.setattr(torch.cuda, name, touched)
    monkeypatch.setattr(torch.cuda, "_lazy_init", touched)
    monkeypatch.setattr(torch.cuda, "init", touched)


def test_cpu_checkpoints_and_load_leave_cuda_alone(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA machine doing CPU work: the RNG state saved with a checkpoint, its restore,
    ``adafilter.load(..., device="cpu")`` and a prediction never read or write CUDA's RNG
    (that would create a CUDA context); a process already using CUDA keeps its state."""
    from adafilter.checkpoint import get_rng_state, load_checkpoint, set_rng_state

    _no_cuda(monkeypatch)
    state = get_rng_state()
    assert state["cuda"] == []
    save_checkpoint(tmp_path / "c.pt", {"rng": state})
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]})  # saved on a GPU
    run = adafilter.load(runs["adafilter"], device="cpu")
    run.predict(val_images(runs["data"])[0][0])
    cuda_state = [torch.arange(16, dtype=torch.uint8)]
    restored: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = get_rng_state()
    assert state["cuda"] is cuda_state
    set_rng_state(state)
    assert restored == [cuda_state]


# ---- predict -------------------------------------------------------------------------------


def test_predict_folder_skips_a_corrupt_file_with_one_warning(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pics"
    for p, _ in val_images(runs["data"]):
        (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / p.parent.name / p.name).write_bytes(p.read_bytes())
    (folder / "cat" / "broken.png").write_bytes(b"this is not a png")
    (folder / "notes.txt").write_text("not an image extension: ignored")
    capsys.readouterr()
    assert main(["predict", "--run", str(runs["adafilter"]), str(folder), "--top-k", "2"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert len(lines) == 4 and all(line.split()[0].endswith(".png") for line in lines)
    assert "broken" not in cap.out and set(lines[0].split()[1::2]) == set(CLASSES)
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adafilter: warning: skipped 1 of 5 images")
    assert "broken.png" in err[0]

    chart = tmp_path / "figs" / "policy.png"
    argv = ["predict", "--run", str(runs["mixed"]), str(folder / "dog"), "--json", "--policy"]
    assert main([*argv, "--top-k", "1", "--policy-out", str(chart)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["0.png", "1.png"]
    assert all(len(r["top_k"]) == 1 and r["top_k"][0]["class"] in CLASSES for r in rows)
    assert all(list(r["policy"]) == ["conv1", "conv2", "conv3"] for r in rows)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_bad_input_is_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(val_images(runs["data"])[0][0])
    line = one_line_error(capsys, ["predict", "--run", str(runs["finetune"]), image, "--policy"])
    assert "without per-image policies" in line and "--policy" in line
    line = one_line_error(capsys, ["predict", "--run", str(runs["finetune"]), "nowhere.png"])
    assert "'nowhere.png' does not exist" in line
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    line = one_line_error(capsys, ["predict", "--run", str(runs["finetune"]), str(bad)])
    assert "none of the images could be read" in line


# ---- export --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_export_round_trips_to_identical_outputs(
    runs: dict[str, Path], tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    to = tmp_path / "out" / f"model.{'pt' if fmt == 'torch' else 'safetensors'}"
    capsys.readouterr()
    assert main(["export", "--run", str(runs["mixed"]), "--to", str(to), "--format", fmt]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == fmt and printed["weights"] == str(to)
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["backbone"] == "tiny-cnn" and meta["class_names"] == CLASSES
    assert meta["method"] == "adafilter" and meta["adafilter"]["gate"] == "lstm"
    assert meta["transform"]["resolution"] == 16 and meta["transform"]["mean"] == [0.5] * 3
    assert meta["transform"]["resize"] == 18  # the run's resized-crop: 16 * 256 / 224
    if fmt == "torch":  # the fallback is a weights_only torch file
        assert torch.load(to, weights_only=True)["format"] == "adafilter-export"

    ref, run = adafilter.load(runs["mixed"]), adafilter.load(to)
    assert run.kind == "export" and run.method == "adafilter" and run.class_names == CLASSES
    assert run.adafilter_config == ref.adafilter_config and run.resolution == ref.resolution
    x = batch(ref, runs["data"])
    assert torch.equal(run.transform(Image.open(val_images(runs["data"])[0][0])), x[0])
    with torch.no_grad():
        assert torch.equal(run.model(x), ref.model(x))
        assert torch.equal(run.model(x[:1]), ref.model(x[:1]))
    ref_state, state = ref.model.state_dict(), run.model.state_dict()
    assert ref_state.keys() == state.keys()
    assert all(torch.equal(ref_state[k], state[k]) for k in state)


def test_export_format_safetensors_needs_the_package(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(adafilter.AdaFilterError, match="pip install safetensors"):
        adafilter.deploy.export_run(runs["finetune"], tmp_path / "m.st", format="safetensors")
    meta = adafilter.deploy.export_run(runs["finetune"], tmp_path / "m.st")  # auto -> torch
    assert meta["weights_format"] == "torch" and adafilter.load(tmp_path / "m.st").kind == "export"


@pytest.mark.parametrize("run_name", ["mixed", "finetune"])
def test_exported_program_matches_the_model(
    runs: dict[str, Path], tmp_path: Path, run_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pt2 = tmp_path / "model.pt2"
    argv = ["export", "--run", str(runs[run_name]), "--to", str(tmp_path / "m.pt")]
    assert main([*argv, "--program", str(pt2)]) == 0
    assert json.loads(capsys.readouterr().out)["program"] == str(pt2)
    program = torch.export.load(str(pt2)).module()
    run = adafilter.load(runs[run_name])
    x = batch(run, runs["data"])
    with torch.no_grad():
        for xb in (x, x[:1], x[:3]):  # dynamic batch size, batch 1 included
            torch.testing.assert_close(program(xb), run.model(xb), atol=1e-5, rtol=1e-5)


def test_random_policy_program_export_is_refused(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = torch.load(runs["mixed"], weights_only=True)
    ckpt["config"]["method"] = "random-policy"  # same tensors, policies from a host RNG
    save_checkpoint(tmp_path / "rp.pt", {k: v for k, v in ckpt.items() if k != "format"})
    assert adafilter.load(tmp_path / "rp.pt").method == "random-policy"
    argv = ["export", "--run", str(tmp_path / "rp.pt"), "--to", str(tmp_path / "rp.safe")]
    line = one_line_error(capsys, [*argv, "--program", str(tmp_path / "rp.pt2")])
    assert "random generator" in line and "cannot be exported as a program" in line
    assert not (tmp_path / "rp.pt2").exists()


# ---- refusals ------------------------------------------------------------------------------


def _other_model(runs: dict[str, Path], path: Path) -> str:
    ckpt = torch.load(runs["adafilter"] / "checkpoint.pt", weights_only=True)
    ckpt["config"]["method"] = "finetune"  # its weights are an AdaFilter model's
    torch.save(ckpt, path)
    return "does not match this model"


def _state_dict(runs: dict[str, Path], path: Path) -> str:
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    return "neither an adafilter checkpoint nor an exported model"


def _garbage(runs: dict[str, Path], path: Path) -> str:
    path.write_bytes(b"\x00garbage" * 10)
    return "cannot read model file"


def _pickled_code(runs: dict[str, Path], path: Path) -> str:
    torch.save({"format": "adafilter-checkpoint", "f": Path("x")}, path)
    return "weights_only"


def _empty_dir(runs: dict[str, Path], path: Path) -> str:
    path.mkdir()
    return "holds no checkpoint.pt"


def _foreign_safetensors(runs: dict[str, Path], path: Path) -> str:
    st = pytest.importorskip("safetensors.torch")
    path.write_bytes(st.save({"w": torch.zeros(2)}, metadata={"origin": "elsewhere"}))
    return "is not an adafilter export"


@pytest.mark.parametrize(
    "make",
    [_other_model, _state_dict, _garbage, _pickled_code, _empty_dir, _foreign_safetensors],
)
def test_foreign_files_are_refused_in_one_line(
    runs: dict[str, Path], tmp_path: Path, make: object, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.pt"
    expected = make(runs, path)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=expected):
        adafilter.load(path)
    image = str(val_images(runs["data"])[0][0])
    assert expected in one_line_error(capsys, ["predict", "--run", str(path), image])
    argv = ["export", "--run", str(path), "--to", str(tmp_path / "y.pt")]
    assert expected in one_line_error(capsys, argv)
