"""tools/train_small_testbed.py: checkpoints resume bit-exactly, bad invocations fail fast, the folder loads.

The runs here use a one-block transformer on 2-frame 32x32 clips (the script's own Run
class with small specs), so the mechanics are tested in seconds; the real size is only
exercised by the training run itself.
"""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ertacache.errors import UserError
from ertacache.testbed import load_testbed, sample_frames
from ertacache.testbed import scene_data as sd
from ertacache.testbed.model import Testbed as ModelSet
from ertacache.testbed.model import TransformerSpec

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("train_small_testbed", ROOT / "tools" / "train_small_testbed.py")
tst = importlib.util.module_from_spec(_spec)
sys.modules["train_small_testbed"] = tst  # dataclasses look their module up while the file executes
_spec.loader.exec_module(tst)

TINY_MODEL = TransformerSpec(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, freq_dim=16,
                             in_channels=48, text_dim=16)
TINY_SCENE = sd.SceneSpec(frames=2, height=32, width=32, object_size=8, grid=4)


def _run(steps: int) -> "tst.Run":
    return tst.Run(tst.SmallTrainConfig(steps=steps, batch_size=2, warmup=2), TINY_MODEL, TINY_SCENE)


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight = _run(4)
    (tmp_path / "a").mkdir()
    tst.train(straight, tmp_path / "a", minutes=10, checkpoint_every=100)
    first = _run(2)
    (tmp_path / "b").mkdir()
    tst.train(first, tmp_path / "b", minutes=10, checkpoint_every=1)
    resumed = tst.Run.from_checkpoint(tmp_path / "b" / tst.CHECKPOINT, steps=4)  # extend 2 -> 4
    assert resumed.step == 2 and resumed.cfg.steps == 4
    tst.train(resumed, tmp_path / "b", minutes=10, checkpoint_every=1)
    assert resumed.losses == straight.losses and len(straight.losses) == 4
    for a, b in zip(straight.ema_tr.state_dict().values(), resumed.ema_tr.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.losses[-1] != resumed.losses[0]  # it did train


def test_object_coverage_is_the_rendered_objects_box_in_latent_pixels():
    """The weighted loss must weigh where the prompted object is drawn, frame by frame."""
    sampler = sd.SceneSampler("train", spec=TINY_SCENE, seed=3)
    _, _, scenes = sampler.batch(4)
    cov = tst.object_coverage(scenes, TINY_SCENE)  # (4, 1, F, 8, 8)
    assert cov.shape == (4, 1, TINY_SCENE.frames, 8, 8)
    s = TINY_SCENE.object_size
    assert torch.allclose(cov.sum(dim=(1, 3, 4)), torch.full((4, TINY_SCENE.frames), s * s / 16.0))
    for i, sc in enumerate(scenes):
        other = "blue" if sc.colour != "blue" else "red"
        a = sampler.render(sc)  # (F, H, W, 3)
        b = sampler.render(dataclasses.replace(sc, colour=other))  # the same clip, the object recoloured
        for f in range(TINY_SCENE.frames):
            drawn = torch.from_numpy(abs(a[f] - b[f]).sum(-1) > 1e-6)  # (H, W): pixels the object covers
            inside = torch.nn.functional.avg_pool2d(drawn[None, None].float(), 4)[0, 0] > 0  # (8, 8)
            assert bool((cov[i, 0, f][inside] > 0).all())  # every latent pixel the object touches is weighted


def test_weighted_loss_is_a_config_choice_and_old_checkpoints_keep_plain_mse(tmp_path):
    with pytest.raises(UserError, match="object-weight"):
        tst.SmallTrainConfig(object_weight=-1.0)
    run = tst.Run(tst.SmallTrainConfig(steps=1, batch_size=2, warmup=2, object_weight=0.0), TINY_MODEL, TINY_SCENE)
    tst.train(run, tmp_path, minutes=10, checkpoint_every=1)
    state = torch.load(tmp_path / tst.CHECKPOINT, weights_only=True)
    del state["config"]["object_weight"]  # as written before the option existed
    torch.save(state, tmp_path / tst.CHECKPOINT)
    assert tst.Run.from_checkpoint(tmp_path / tst.CHECKPOINT, steps=2).cfg.object_weight == 0.0


def test_learning_rate_warms_up_then_stays_constant():
    cfg = tst.SmallTrainConfig(lr=1e-3, warmup=10)
    assert tst.lr_at(0, cfg) == pytest.approx(1e-4)
    assert tst.lr_at(9, cfg) == tst.lr_at(500, cfg) == tst.lr_at(10**6, cfg) == pytest.approx(1e-3)


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="--lr"):
        tst.SmallTrainConfig(lr=5.0)
    with pytest.raises(UserError):
        tst.SmallTrainConfig(steps=0)


def test_cli_refuses_to_resume_nothing_or_to_overwrite_a_run(tmp_path, capsys):
    assert tst.main(["--work", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / tst.CHECKPOINT).write_bytes(b"not a checkpoint")
    assert tst.main(["--work", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert tst.main(["--work", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert tst.CHECKPOINT in err and "delete it" in err
    assert tst.main(["--work", str(tmp_path / "x"), "--threads", "0"]) == 2


def test_written_folder_loads_with_from_pretrained_and_samples(tmp_path):
    run = _run(1)
    facts = {"name": "test", "frames": TINY_SCENE.frames, "height": TINY_SCENE.height, "width": TINY_SCENE.width,
             "shift": 3.0, "guidance_scale": 3.0, "recommended_steps": 2}
    out = tmp_path / "asset"
    out.mkdir()
    (out / "stale.txt").write_text("replaced as a whole")
    tst.write_folder(out, ModelSet(run.ema_tr, run.ema_te, run.vae, facts))
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob("asset.*"))
    assert json.loads((out / "testbed.json").read_text())["size_mb"] > 0
    tb = load_testbed(out)
    frames = sample_frames(tb, ["red circle moving left on flower"], [0])
    assert frames.shape == (1, 2, 32, 32, 3) and frames.dtype == torch.uint8


def test_bf16_autocast_trains_in_float32_weights_and_resumes_with_its_config(tmp_path):
    run = tst.Run(tst.SmallTrainConfig(steps=2, batch_size=2, warmup=2, bf16=True), TINY_MODEL, TINY_SCENE)
    tst.train(run, tmp_path, minutes=10, checkpoint_every=1)
    assert all(torch.isfinite(torch.tensor(run.losses))) and len(run.losses) == 2
    assert all(p.dtype == torch.float32 for p in run.transformer.parameters())  # autocast, not a cast
    assert tst.Run.from_checkpoint(tmp_path / tst.CHECKPOINT, steps=3).cfg.bf16 is True
