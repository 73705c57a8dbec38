"""A pretraining process killed with SIGKILL resumes from its last checkpoint to the same result."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_dataset import make_data_dir

from xrayops.models.backbone import load_backbone
from xrayops.train import PretrainConfig, pretrain

torch.set_num_threads(1)

CFG = dict(epochs=3, batch_size=8, proj_hidden_dim=32, proj_out_dim=8, checkpoint_every_steps=1)

# The child trains like any run; each step is slowed down so the kill lands mid-run.
CHILD = """
import sys, time, torch
from pathlib import Path
import importlib
P = importlib.import_module("xrayops.train.pretrain")
torch.set_num_threads(1)
original = P.train_step
def slow_step(*args, **kwargs):
    time.sleep(0.4)
    return original(*args, **kwargs)
P.train_step = slow_step
cfg = P.PretrainConfig(method=sys.argv[3], **{cfg!r})
P.pretrain(Path(sys.argv[1]), Path(sys.argv[2]), cfg, progress=False)
"""


# BYOL: the checkpoint must also carry the momentum (target) encoder.
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, method):
    data = make_data_dir(tmp_path / "data", n_per_class=6, n_unknown=4, size=32)  # 28 images: 3 steps per epoch
    cfg = PretrainConfig(method=method, **CFG)
    straight = pretrain(data.data_dir, tmp_path / "straight", cfg, progress=False)
    assert straight.steps == 9

    out = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(cfg=CFG))
    child = subprocess.Popen(
        [sys.executable, str(script), str(data.data_dir), str(out), method],
        env={**os.environ, "OMP_NUM_THREADS": "1", "XRAYOPS_PROGRESS": "0"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    killed_at = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            checkpoint = out / "checkpoint.pt"
            if checkpoint.exists():
                step = torch.load(checkpoint, weights_only=True)["step"]
                if step >= 4:  # mid-way through epoch 2
                    os.kill(child.pid, signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.05)
    finally:
        if child.poll() is None and killed_at is None:
            child.kill()
        child.wait(timeout=30)
    assert killed_at is not None, child.stdout.read().decode()[-2000:]
    assert child.returncode == -signal.SIGKILL
    assert not (out / "backbone.pt").exists()  # it died before finishing

    resumed = pretrain(data.data_dir, out, cfg, progress=False)
    assert 4 <= resumed.resumed_from_step < 9 and resumed.steps == 9
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    a, _, _ = load_backbone(straight.backbone_path)
    b, _, _ = load_backbone(resumed.backbone_path)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name
