"""The training loop on small models: schedules, exact resume, NaN stop, micro-batches, validation, config errors."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from med3dcore.checkpoint_files import safe_load
from med3dcore import bf16_guard, devices
from med3dcore.devices import cpu_bf16_gradients_ok, cpu_bf16_support
from med3dcore.errors import Med3DError
from med3dcore.nets import build_model
from med3dcore.train import split_batch, train
from med3dcore.training_setup import (TrainConfig, ce_dice_loss, lr_factor, make_adam, param_groups, seed_everything,
                                      training_layout)

torch.set_num_threads(2)


class TinyNet(nn.Module):
    """A conv + BatchNorm + 'encoder'/'head' split, enough to exercise everything the loop does."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.head = nn.Conv3d(4, 3, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


class Batches:
    """Deterministic stateful batch source (as a sampler is): its own generator, saved with the checkpoint."""

    def __init__(self, n: int = 4, seed: int = 0) -> None:
        self.n, self.rng = n, np.random.default_rng(seed)

    def next_batch(self, step):
        x = self.rng.normal(size=(self.n, 1, 6, 6, 6)).astype(np.float32)
        y = (x[:, 0] > 0.3).astype(np.int64) + (x[:, 0] > 1.0)
        return {"image": torch.from_numpy(x), "label": torch.from_numpy(y)}

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


def seg_loss(model, batch):
    loss = ce_dice_loss(model(batch["image"]), batch["label"])
    return loss, {"domain": "toy"}


def _run(tmp, steps=6, resume=False, init_seed=0, **cfg):
    seed_everything(init_seed)  # a resumed run's fresh weights and generators are replaced by the checkpoint's
    model = TinyNet()
    batches = Batches(seed=init_seed)
    config = TrainConfig(steps=steps, batch_size=4, lr=0.01, device="cpu", **cfg)
    result = train(model, config, batches.next_batch, seg_loss, tmp, stateful={"sampler": batches}, resume=resume)
    return model, result


def test_training_lowers_the_loss(tmp_path):
    _, result = _run(tmp_path, steps=25, schedule="constant", checkpoint_every=0)
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 25 and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert result.last_path.is_file() and safe_load(result.last_path)["step"] == 25


class CrashAt(Batches):
    def __init__(self, crash_step, seed=0):
        super().__init__(seed=seed)
        self.crash_step = crash_step

    def next_batch(self, step):
        if step == self.crash_step:
            raise KeyboardInterrupt("simulated crash")
        return super().next_batch(step)


def test_resume_continues_exactly(tmp_path):
    full, _ = _run(tmp_path / "full", steps=7, checkpoint_every=3)
    # A run that crashes in step 5 (its last.pt is from step 3), then resumes with fresh objects.
    seed_everything(0)
    crashing = CrashAt(5)
    config = TrainConfig(steps=7, batch_size=4, lr=0.01, device="cpu", checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(TinyNet(), config, crashing.next_batch, seg_loss, tmp_path / "part", stateful={"sampler": crashing})
    assert safe_load(tmp_path / "part" / "checkpoints" / "last.pt")["step"] == 3
    stale = tmp_path / "part" / "checkpoints" / ".last.pt.k1ll3d.tmp"  # what a kill during a save leaves
    stale.write_bytes(b"half a checkpoint")
    resumed, result = _run(tmp_path / "part", steps=7, resume=True, checkpoint_every=3, init_seed=123)
    assert not stale.exists()
    assert [r["step"] for r in result.history] == list(range(1, 8))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_without_checkpoint_and_rerun_over_one_are_errors(tmp_path):
    with pytest.raises(Med3DError, match="does not exist; start without --resume"):
        _run(tmp_path, steps=2, resume=True)
    _run(tmp_path, steps=2)
    with pytest.raises(Med3DError, match="exists from an earlier run; pass --resume"):
        _run(tmp_path, steps=2)
    with pytest.raises(Med3DError, match="holds a different network"):
        seed_everything(0)
        other = nn.Sequential(nn.Conv3d(1, 2, 1))
        train(other, TrainConfig(steps=3, batch_size=4, device="cpu"), Batches().next_batch,
              lambda m, b: (m(b["image"]).mean(), {}), tmp_path, resume=True)
    with pytest.raises(Med3DError, match="different batch_size"):
        seed_everything(0)
        train(TinyNet(), TrainConfig(steps=3, batch_size=2, device="cpu"), Batches(2).next_batch, seg_loss,
              tmp_path, resume=True)


class PoisonAfter(Batches):
    def __init__(self, bad_step):
        super().__init__()
        self.bad_step = bad_step

    def next_batch(self, step):
        batch = super().next_batch(step)
        if step >= self.bad_step:
            batch["image"][:] = float("nan")
        return batch


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    seed_everything(0)
    model = TinyNet()
    source = PoisonAfter(bad_step=5)
    config = TrainConfig(steps=8, batch_size=4, lr=0.01, device="cpu", checkpoint_every=2)
    with pytest.raises(Med3DError) as err:
        train(model, config, source.next_batch, seg_loss, tmp_path, stateful={"sampler": source})
    message = str(err.value)
    assert "loss became nan at step 5 (domain 'toy')" in message
    assert "last good checkpoint" in message and "(step 4) is kept" in message
    ckpt = safe_load(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    # The kept checkpoint resumes (here with clean data) to the end.
    seed_everything(0)
    model2 = TinyNet()
    clean = Batches()
    result = train(model2, config, clean.next_batch, seg_loss, tmp_path, stateful={"sampler": clean}, resume=True)
    assert result.history[-1]["step"] == 8 and math.isfinite(result.history[-1]["loss"])


def test_nan_before_any_checkpoint_says_so(tmp_path):
    seed_everything(0)
    source = PoisonAfter(bad_step=1)
    with pytest.raises(Med3DError, match="no checkpoint was written yet"):
        train(TinyNet(), TrainConfig(steps=3, batch_size=4, device="cpu"), source.next_batch, seg_loss, tmp_path)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_micro_batches_equal_the_average_of_separate_halves(tmp_path):
    """batch 4 in micro-batches of 2 = what two processes with 2 samples each compute (BatchNorm per half)."""
    seed_everything(0)
    model = TinyNet()
    reference = TinyNet()
    reference.load_state_dict(model.state_dict())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batch = Batches().next_batch(1)
    config = TrainConfig(steps=1, batch_size=4, micro_batch=2, lr=0.01, device="cpu", schedule="constant",
                         amp="off")  # the reference below computes in float32
    train(model, config, lambda step: batch, seg_loss, tmp_path)
    # By hand: gradients of each half, averaged, one Adam step.
    grads = []
    for half in split_batch(batch, 2):
        reference.zero_grad()
        seg_loss(reference, half)[0].backward()
        grads.append([p.grad.clone() for p in reference.parameters()])
    # BatchNorm running statistics: each half updates from the same start, the results are averaged.
    bn = reference.encoder[1]
    start = (initial["encoder.1.running_mean"], initial["encoder.1.running_var"])
    updates = []
    for half in split_batch(batch, 2):
        bn.running_mean.copy_(start[0])
        bn.running_var.copy_(start[1])
        reference(half["image"])
        updates.append((bn.running_mean.clone(), bn.running_var.clone()))
    assert torch.allclose(model.encoder[1].running_mean, (updates[0][0] + updates[1][0]) / 2, atol=1e-6)
    assert torch.allclose(model.encoder[1].running_var, (updates[0][1] + updates[1][1]) / 2, atol=1e-6)
    opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    for p, g0, g1 in zip(reference.parameters(), *grads):
        p.grad = (g0 + g1) / 2
    opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # Whereas the full batch of 4 through BatchNorm at once is a different computation.
    full = TinyNet()
    seed_everything(0)
    full = TinyNet()
    config_full = TrainConfig(steps=1, batch_size=4, lr=0.01, device="cpu", schedule="constant")
    train(full, config_full, lambda step: batch, seg_loss, tmp_path / "full")
    assert not torch.allclose(full.encoder[0].weight, model.encoder[0].weight, atol=1e-7)


def test_param_groups_and_schedules():
    model = TinyNet()
    groups = param_groups(model, lr=0.01, pretrained_lr=0.001)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("pretrained", 0.001, 4), ("new", 0.01, 2)]
    for p in model.encoder.parameters():
        p.requires_grad = False
    assert [g["name"] for g in param_groups(model, 0.01)] == ["new"]
    poly = TrainConfig(steps=10, schedule="poly", poly_power=1.0, warmup_steps=2)
    assert [round(lr_factor(s, poly), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    cosine = TrainConfig(steps=10, schedule="cosine")
    assert lr_factor(0, cosine) == 1.0 and lr_factor(5, cosine) == pytest.approx(0.5) and lr_factor(10, cosine) == 0
    assert TrainConfig(epochs=3, steps_per_epoch=4).total_steps == 12
    assert TrainConfig.from_dict({"lr": "1e-3", "steps": "10"}).lr == 0.001  # YAML reads 1e-3 as a string


def test_learning_rates_follow_the_schedule_per_group(tmp_path):
    seed_everything(0)
    model = TinyNet()
    seen = []
    batches = Batches()
    config = TrainConfig(steps=4, batch_size=4, lr=0.01, pretrained_lr=0.001, schedule="poly", poly_power=1.0,
                         device="cpu", checkpoint_every=0)
    train(model, config, batches.next_batch, seg_loss, tmp_path,
          reporter=lambda e: seen.append(e["metrics"]["lr"]) if e.get("kind") == "progress" else None)
    assert seen == pytest.approx([0.0075, 0.005, 0.0025, 0.0])  # lr after each update: 0.01 * (1 - s/4)
    ckpt = safe_load(tmp_path / "checkpoints" / "last.pt")
    assert [g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]] == [0.001, 0.01]


def test_validation_keeps_the_best_checkpoint(tmp_path):
    seed_everything(0)
    model = TinyNet()
    batches = Batches()
    scores = iter([0.2, 0.9, 0.5])
    config = TrainConfig(steps=6, batch_size=4, device="cpu", validate_every=2, best_metric="dice",
                         checkpoint_every=0)
    result = train(model, config, batches.next_batch, seg_loss, tmp_path,
                   validate=lambda m: {"dice": next(scores)})
    assert result.best["step"] == 4 and result.best["value"] == 0.9
    assert safe_load(result.best_path)["step"] == 4


@pytest.mark.parametrize("settings,message", [
    ({"steps": 0}, "steps must be at least 1"),
    ({"schedule": "step"}, "schedule 'step' unknown"),
    ({"amp": "fp8"}, "amp 'fp8' unknown"),
    ({"epochs": 2}, "epochs needs steps_per_epoch"),
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"steps": 2.5}, "steps must be a whole number"),
])
def test_bad_training_settings_are_clear_errors(settings, message):
    with pytest.raises(Med3DError, match=message):
        TrainConfig(**settings)
    with pytest.raises(Med3DError, match="unknown training setting"):
        TrainConfig.from_dict({"stepz": 3})


def test_batch_not_divisible_into_micro_batches(tmp_path):
    with pytest.raises(Med3DError, match="not a multiple of micro_batch 3"):
        train(TinyNet(), TrainConfig(steps=1, batch_size=4, micro_batch=3, device="cpu"), Batches().next_batch,
              seg_loss, tmp_path)


def test_ce_dice_loss_is_low_for_a_perfect_prediction():
    labels = torch.randint(0, 3, (2, 4, 4, 4))
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float() * 40
    assert float(ce_dice_loss(perfect, labels)) < 1e-3
    assert float(ce_dice_loss(-perfect, labels)) > 2.0


# ------------------------------------------------------------------------------------------------ Adam's form

def _adam_steps(kind: str, steps: int = 3):
    seed_everything(0)
    model = TinyNet()
    optimizer = make_adam(param_groups(model, lr=0.01, pretrained_lr=0.001), 0.01, 1e-4, kind=kind)
    batch = Batches().next_batch(1)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        seg_loss(model, batch)[0].backward()
        optimizer.step()
    return model, optimizer


def test_every_adam_form_makes_the_same_update():
    """fused / foreach / loop: the same Adam, per-group rates and weight decay included (float rounding apart)."""
    reference, optimizer = _adam_steps("loop")
    assert not optimizer.param_groups[0]["foreach"]
    for kind in ("foreach", "fused", "auto"):
        model, optimizer = _adam_steps(kind)
        for a, b in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(a, b, atol=1e-6), kind
    assert _adam_steps("auto")[1].param_groups[0].get("fused")  # this torch (>= 2.4) has fused Adam on CPU


def test_adam_falls_back_when_fused_is_missing(monkeypatch):
    """A torch without fused Adam for the device (CPU before 2.4) gets foreach, then the loop."""
    real = torch.optim.Adam

    def adam(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", adam)
    assert make_adam([{"params": list(TinyNet().parameters())}], 0.01, 0.0).param_groups[0]["foreach"]
    with pytest.raises(RuntimeError, match="fused"):
        make_adam([{"params": list(TinyNet().parameters())}], 0.01, 0.0, kind="fused")
    with pytest.raises(Med3DError, match="unknown Adam form 'sgd'"):
        make_adam([{"params": list(TinyNet().parameters())}], 0.01, 0.0, kind="sgd")


def test_segmentation_networks_train_channels_last_on_cpu(tmp_path):

    lung = build_model({"backbone": {"depth": 10, "shortcut_type": "B"},
                        "head": {"type": "lung_decoder", "num_classes": 2, "channels": [8, 8, 8]}})
    classifier = build_model({"backbone": {"depth": 10, "shortcut_type": "B"},
                              "head": {"type": "classifier", "num_classes": 2}})
    assert training_layout(lung, torch.device("cpu")) and not training_layout(classifier, torch.device("cpu"))
    assert not training_layout(lung, torch.device("cuda"))
    x = torch.randn(2, 1, 8, 16, 16)
    y = (x[:, 0] > 0).long()
    config = TrainConfig(steps=1, batch_size=2, lr=0.01, device="cpu")
    train(lung, config, lambda step: (x, y), lambda m, b: (ce_dice_loss(m(b[0]), b[1]), {}), tmp_path)
    assert lung.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    saved = safe_load(tmp_path / "checkpoints" / "last.pt")["model"]
    reloaded = build_model({"backbone": {"depth": 10, "shortcut_type": "B"},
                            "head": {"type": "lung_decoder", "num_classes": 2, "channels": [8, 8, 8]}})
    reloaded.load_state_dict(saved)  # a channels-last checkpoint loads into a plain network: same values
    assert torch.equal(reloaded.encoder.conv1.weight, lung.encoder.conv1.weight)



@pytest.mark.parametrize("amp, expected", [("bf16", torch.bfloat16), ("auto", "native"), ("off", None)])
def test_bf16_autocast_on_a_cpu(tmp_path, amp, expected):
    """amp bf16 trains a CPU step under bf16 autocast (the convolution's output is bf16; the weights and the
    optimiser stay float32); auto does so only on a CPU with native bfloat16; off keeps float32."""
    if expected == "native":  # and its bf16 weight gradients pass the check (devices.cpu_bf16_gradients_ok)
        expected = torch.bfloat16 if cpu_bf16_support() and cpu_bf16_gradients_ok(depth=4) else None
    seen = []

    def loss(model, batch):
        logits = model(batch["image"])
        seen.append(logits.dtype)
        return ce_dice_loss(logits.float(), batch["label"]), {}

    seed_everything(0)
    model = TinyNet()
    config = TrainConfig(steps=3, batch_size=4, lr=0.01, device="cpu", amp=amp, checkpoint_every=0)
    events = []
    result = train(model, config, Batches().next_batch, loss, tmp_path, reporter=events.append)
    assert seen == [expected or torch.float32] * 3
    start = next(e["message"] for e in events if e.get("message", "").startswith("starting"))
    assert ("bfloat16 autocast" in start) == (expected is not None), start
    assert ("gradients failed med3d's check" in start) == (amp == "auto" and expected is None
                                                          and cpu_bf16_support() is not None), start
    # where two-voxel maps fail the check, bf16 training says that thin maps run in float32
    assert ("maps 3 voxels thin or less in float32" in start) == (expected is not None
                                                                   and not cpu_bf16_gradients_ok(depth=2)), start
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(r["loss"]) for r in result.history)


@pytest.mark.parametrize("native, thin_ok, deep_ok, auto, guarded", [
    ("AMX", True, True, torch.bfloat16, False), ("AVX512_BF16", True, True, torch.bfloat16, False),
    ("AVX512_BF16", False, True, torch.bfloat16, True), ("AVX512_BF16", False, False, None, False),
    (None, True, True, None, False)])
def test_auto_trains_in_bf16_where_its_gradients_are_right(monkeypatch, native, thin_ok, deep_ok, auto, guarded):
    """auto: bf16 on a CPU with native bfloat16 whose bf16 weight gradients over four-voxel maps pass the check;
    where two-voxel maps fail it (an AMD Zen 5 CPU with torch 2.13: oneDNN's weight gradients there are garbage)
    the thin maps' convolutions run in float32 (bf16_guard), for auto and for an explicit bf16 alike."""
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: native)
    monkeypatch.setattr(devices, "cpu_bf16_gradients_ok", lambda depth=2: thin_ok if depth <= 3 else deep_ok)
    monkeypatch.setattr(bf16_guard, "cpu_bf16_gradients_ok", devices.cpu_bf16_gradients_ok)
    cpu = torch.device("cpu")
    assert devices.training_autocast("auto", cpu) == auto
    assert devices.training_autocast("bf16", cpu) == torch.bfloat16
    assert devices.training_autocast("off", cpu) is None
    guard = bf16_guard.thin_map_guard(cpu, devices.training_autocast("auto", cpu))
    assert isinstance(guard, bf16_guard.ThinMapsInFloat32) == guarded
    assert not isinstance(bf16_guard.thin_map_guard(cpu, None), bf16_guard.ThinMapsInFloat32)
    assert isinstance(bf16_guard.thin_map_guard(cpu, torch.bfloat16), bf16_guard.ThinMapsInFloat32) == (not thin_ok)


def test_thin_maps_run_in_float32_and_nothing_else_changes():
    """Under CPU bf16 autocast the guard gives convolutions over maps at most 3 voxels thin float32 inputs and
    outputs, and leaves thicker maps, other operations and code outside autocast as they were."""
    torch.manual_seed(0)
    conv, up = torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.ConvTranspose3d(4, 4, 2, stride=2)
    thin, thick = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 4, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), bf16_guard.ThinMapsInFloat32():
        assert conv(thin).dtype == up(thin).dtype == torch.float32
        assert conv(thick).dtype == torch.bfloat16 and torch.relu(thin).dtype == torch.float32
        assert conv(thin.bfloat16()).dtype == torch.float32  # a bf16 map from an earlier layer is widened
    with bf16_guard.ThinMapsInFloat32():
        assert torch.equal(conv(thin), conv(thin.clone()))
    with torch.no_grad():
        torch.testing.assert_close(conv(thin), _guarded(conv, thin), rtol=0, atol=0)


def _guarded(module, x):
    with torch.autocast("cpu", dtype=torch.bfloat16), bf16_guard.ThinMapsInFloat32():
        return module(x)


def test_guarded_bf16_weight_gradients_follow_float32_on_small_patches():
    """The liver preset's 8x16x16 patches reach two-voxel maps from layer1 on. With the guard every weight gradient
    of a ResNet-10 with the lung decoder points where float32's does (cosine >= 0.85; bf16 rounding gives 0.92-0.97;
    on the Zen 5 CPU without the guard layer1 and the decoder fell to -0.001..0.43)."""
    torch.manual_seed(0)
    model = build_model({"backbone": {"depth": 10, "shortcut_type": "B"},
                         "head": {"type": "lung_decoder", "num_classes": 2, "channels": [16, 16, 16]}})
    x = torch.randn(2, 1, 8, 16, 16)

    def gradients(guard):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=guard is not None), \
                guard or contextlib.nullcontext():
            out = model(x)
        out.float().square().mean().backward()
        return {n: p.grad.flatten().double() for n, p in model.named_parameters() if p.dim() > 1}

    reference, guarded = gradients(None), gradients(bf16_guard.ThinMapsInFloat32())
    cosines = {n: float(torch.nn.functional.cosine_similarity(guarded[n], reference[n], dim=0)) for n in reference}
    assert min(cosines.values()) >= 0.85, sorted(cosines.items(), key=lambda item: item[1])[:3]


def test_the_bf16_gradient_check_is_a_stable_answer():
    devices.cpu_bf16_gradients_ok.cache_clear()
    first = devices.cpu_bf16_gradients_ok()
    devices.cpu_bf16_gradients_ok.cache_clear()
    assert isinstance(first, bool) and devices.cpu_bf16_gradients_ok() == first


def test_fp16_on_a_cpu_is_refused_in_one_line(tmp_path):
    config = TrainConfig(steps=1, batch_size=4, lr=0.01, device="cpu", amp="fp16")
    with pytest.raises(Med3DError, match="amp 'fp16' needs a CUDA device; on a CPU use bf16"):
        train(TinyNet(), config, Batches().next_batch, seg_loss, tmp_path)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
