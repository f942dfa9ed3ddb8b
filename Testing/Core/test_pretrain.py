"""Multi-domain pretraining: branch isolation, export, a SIGKILLed and resumed real run, torchrun on CPU, CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from med3dcore.bundles import load_bundle, model_from_bundle
from med3dcore.checkpoint_files import safe_load
from med3dcore.domains import load_run_config
from med3dcore.errors import Med3DError
from med3dcore.medicalnet import load_medicalnet
from med3dcore.nets import resnet3d
from med3dcore.phantoms import write_phantom_domains
from med3dcore.pretrain import MultiDomainNet, build_pretrain_model, pretrain, pretrain_loss
from med3dcore.progress import decode_event
from med3dcore.train import train
from med3dcore.training_setup import TrainConfig, seed_everything

torch.set_num_threads(2)
TINY = {"steps": 6, "batch_size": 2, "patch_size": [16, 16, 16], "checkpoint_every": 2}


@pytest.fixture(scope="module")
def phantom_config(tmp_path_factory):
    return write_phantom_domains(tmp_path_factory.mktemp("domains"), n_cases=1, seed=0, shape=(16, 20, 20))


def test_a_step_on_one_domain_changes_only_the_encoder_and_that_branch(tmp_path):
    from med3dcore.nets.model import build_encoder
    seed_everything(0)
    model = MultiDomainNet(build_encoder({"depth": 10, "shortcut_type": "B"}), {"a": 3, "b": 2, "c": 4})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 16, 16, 16)
    plan = {1: ("a", 3), 2: ("b", 2)}  # step 1 trains branch a, step 2 branch b
    snapshot = {}

    def next_batch(step):
        name, classes = plan[step]
        return {"image": x, "label": torch.randint(0, classes, (2, 16, 16, 16)), "domain_name": name}

    def loss(m, batch):
        if batch["domain_name"] == "b" and not snapshot:
            snapshot.update({k: v.clone() for k, v in m.state_dict().items()})  # weights after step 1
        return pretrain_loss(m, batch)

    train(model, TrainConfig(steps=2, batch_size=2, lr=0.01, device="cpu", schedule="constant"), next_batch,
          loss, tmp_path)
    after = model.state_dict()

    def changed(state_a, state_b, prefix):
        keys = [k for k in state_a if k.startswith(prefix) and state_a[k].is_floating_point()]
        assert keys
        return [k for k in keys if not torch.equal(state_a[k], state_b[k])]

    # Step 1 (domain a): encoder and branch a moved; b and c bitwise untouched.
    assert changed(before, snapshot, "encoder.") and changed(before, snapshot, "branches.a.")
    assert not changed(before, snapshot, "branches.b.") and not changed(before, snapshot, "branches.c.")
    # Step 2 (domain b): branch a keeps its step-1 weights bit for bit (no Adam momentum update), c never moved.
    assert changed(snapshot, after, "encoder.") and changed(snapshot, after, "branches.b.")
    assert not changed(snapshot, after, "branches.a.") and not changed(before, after, "branches.c.")


def test_pretrain_exports_a_bundle_and_a_medicalnet_file(phantom_config, tmp_path):
    events = []
    result = pretrain(phantom_config, tmp_path / "run", device="cpu", reporter=events.append, cache_dir=None,
                      overrides=dict(TINY, steps=4))  # no cache here; the subprocess tests use the default one
    assert not (tmp_path / "run" / "cache").exists()
    # MedicalNet layout: module.<key>, backbone only, loads strictly into resnet3d of the same depth.
    raw = safe_load(result.medicalnet_path)
    assert set(raw) == {"state_dict"} and all(k.startswith("module.") for k in raw["state_dict"])
    assert not any("conv_seg" in k or "branches" in k for k in raw["state_dict"])
    net = resnet3d(10, "B", num_seg_classes=None)
    load_medicalnet(net, result.medicalnet_path)
    trained = safe_load(result.train.last_path)["model"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, trained[f"encoder.{key}"]), key
    with pytest.raises(Med3DError, match="depth"):
        load_medicalnet(resnet3d(18, "A", num_seg_classes=None), result.medicalnet_path)
    # The bundle: task encoder, provenance with domains, spacings, steps and final losses.
    bundle = load_bundle(result.bundle_path)
    assert bundle.task["type"] == "encoder"
    domains = bundle.provenance["data"]["domains"]
    assert [d["name"] for d in domains] == ["phantom_ct_lung", "phantom_ct_liver", "phantom_ct_bone",
                                            "phantom_mr_abdomen"]
    assert domains[1]["spacing"] == [1.5, 1.5, 3.0] and domains[3]["modality"] == "MR"
    assert bundle.provenance["steps"] == 4
    assert set(result.final_losses) == {d["name"] for d in domains}
    assert all(d["final_loss"] > 0 for d in domains)
    assert set(bundle.extra["branches"]) == {d["name"] for d in domains}
    model = model_from_bundle(bundle)
    assert torch.equal(model.encoder.conv1.weight, net.conv1.weight)
    # Progress: per-domain losses in the events, and a final result event.
    progress = [e for e in events if e.get("stage") == "pretrain" and e["kind"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    assert "loss[phantom_ct_lung]" in progress[-1]["metrics"] and "loss[phantom_mr_abdomen]" in progress[-1]["metrics"]
    assert events[-1]["kind"] == "result"


def _cli(*args):
    return [sys.executable, "-c", "import sys; from med3dcore.cli import main; sys.exit(main())", *args]


def _tiny_args(config, out, **extra):
    args = ["pretrain", "--config", str(config), "--out", str(out), "--device", "cpu", "--progress", "jsonl"]
    for key, value in dict(TINY, **extra).items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(phantom_config, tmp_path):
    reference = pretrain(phantom_config, tmp_path / "ref", device="cpu", overrides=TINY)
    out = tmp_path / "killed"
    # The same thread count as this process: conv reductions split by thread, and exact resume is the claim.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(_cli(*_tiny_args(phantom_config, out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    killed_after = None
    for line in proc.stdout:
        event = decode_event(line)
        if event and event.get("kind") == "progress" and event.get("stage") == "pretrain" and event["step"] >= 5:
            proc.send_signal(signal.SIGKILL)  # no chance to clean up: mid-training, after the step-4 checkpoint
            killed_after = event["step"]
            break
    proc.wait(timeout=120)
    assert killed_after is not None and proc.returncode == -signal.SIGKILL
    ckpt = safe_load(out / "checkpoints" / "last.pt")  # intact, the last complete one
    assert ckpt["step"] == 4
    assert not (out / "encoder_bundle.pt").exists()
    done = subprocess.run(_cli(*_tiny_args(phantom_config, out), "--resume"), capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    steps = [e["step"] for e in map(decode_event, done.stdout.splitlines()) if e and e.get("stage") == "pretrain"
             and e["kind"] == "progress"]
    assert steps == [5, 6]
    resumed = safe_load(out / "checkpoints" / "last.pt")["model"]
    expected = safe_load(reference.train.last_path)["model"]
    for key, value in expected.items():
        assert torch.allclose(value.float(), resumed[key].float(), atol=1e-5, rtol=1e-5), key
    losses = [r["loss"] for r in json.loads(safe_load(out / "checkpoints" / "last.pt")["history"])]
    assert losses == pytest.approx([r["loss"] for r in reference.train.history], rel=1e-5)
    assert not list((out / "checkpoints").glob(".*.tmp"))  # a write cut short would be cleaned up on resume


def assert_same_training(single: dict, other: dict, initial: dict) -> None:
    """Two runs that compute the same gradient steps up to float32 summation order end with the same weights and
    BatchNorm statistics, measured per tensor against how far training moved that tensor.

    Summation order (micro-batch sums in one process vs a gloo all-reduce across two) changes gradients by a few
    float32 ulps (~1e-7 relative). Adam's first steps move each weight by about lr * sign(gradient), so the rare
    element whose gradient is itself at rounding level may step the other way: one such element in a tensor of n
    moves ||difference|| by ~2/sqrt(n) of ||update|| (0.25 for a 64-channel BatchNorm), but the chance of one among
    the few thousand BatchNorm elements is ~1e-3 and large tensors dilute it. So: the difference of the final
    weights must be under 1 % of the tensor's total update (observed: under 2e-4; 40-100 % when the all-reduce is
    skipped or the processes train on other samples), plus a floor of 1e-6 of the tensor's norm for tensors that
    barely moved (branches no step visited stay bitwise equal to their initial values).
    """
    worst = []
    for key, value in single.items():
        if not value.is_floating_point():
            continue
        a, b, start = value.double(), other[key].double(), initial[key].double()
        moved = float((a - start).norm())
        gap = float((a - b).norm())
        worst.append((gap / max(moved, 1e-30), key))
        assert gap <= 1e-2 * moved + 1e-6 * float(a.norm()), (
            f"{key}: runs differ by {gap:.3g} for an update of {moved:.3g} (numel {value.numel()})")
    assert max(worst)[0] < 1e-2


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(phantom_config, tmp_path):
    """Global batch 4: two gloo ranks with 2 samples each vs one process with micro-batches of 2 (BatchNorm
    statistics are per 2 samples in both; gradients averaged over the 4). Checked by hand to fail when the gradient
    all-reduce is skipped, when both ranks take the same samples, and when the ranks train different branches."""
    # float32: the claim is data-parallel arithmetic; bf16 autocast (auto on a CPU with native bf16) would round
    # sums taken in another order to different bf16 values, noise of its own.
    settings = {"steps": 3, "batch_size": 4, "micro_batch": 2, "checkpoint_every": 0, "amp": "off"}
    single = pretrain(phantom_config, tmp_path / "single", device="cpu", overrides=dict(TINY, **settings))
    seed_everything(0)  # what pretrain() does before building the model: the shared starting point
    initial = build_pretrain_model(load_run_config(phantom_config)).state_dict()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = tmp_path / "med3d_entry.py"  # what the `med3d` console script does
    script.write_text("import sys\nfrom med3dcore.cli import main\nsys.exit(main())\n")
    # --standalone: torchrun binds a free port itself (no race between choosing a port and binding it).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script)] + _tiny_args(phantom_config, tmp_path / "ddp", **settings)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [e for e in map(decode_event, done.stdout.splitlines()) if e]
    progress = [e for e in events if e.get("stage") == "pretrain" and e["kind"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3]  # rank 0 alone reports
    assert any("2 processes" in e.get("message", "") for e in events)
    ddp_losses = [e["metrics"]["loss"] for e in progress]
    single_losses = [r["loss"] for r in single.train.history]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4, abs=1e-5)
    ddp_model = safe_load(tmp_path / "ddp" / "checkpoints" / "last.pt")["model"]
    assert_same_training(safe_load(single.train.last_path)["model"], ddp_model, initial)


def test_cli_errors_are_one_line(phantom_config, tmp_path):
    done = subprocess.run(_cli("pretrain", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("med3d pretrain: error: config file") and "does not exist" in done.stderr
    with pytest.raises(Med3DError, match="patch_size must be three whole numbers"):
        pretrain(phantom_config, tmp_path / "o", overrides={"patch_size": "big"})
    with pytest.raises(Med3DError, match="unknown training setting\\(s\\) stepz"):
        pretrain(phantom_config, tmp_path / "o", overrides={"stepz": 3})
