import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def _two_threads():
    """The project's CI machines have 2 cores; pin torch to them for stable timings."""
    torch.set_num_threads(2)


def write_small_folder(out: Path, spec=None, seed: int = 0) -> Path:
    """A ``wan2.1-small`` folder with random weights, written by the trainer's own ``write_folder``.

    The same layout and facts the training run writes (transformer/, text_encoder/, vae/ from
    save_pretrained, testbed.json), so loading, CLIs and packaging are tested before, and
    independently of, the trained weights. ``spec`` shrinks the transformer where only the
    plumbing matters.
    """
    import dataclasses
    import importlib.util

    from ertacache.testbed import scene_data as sd
    from ertacache.testbed.model import Testbed
    from ertacache.testbed.small import SMALL_MODEL_ID, SMALL_SCENE, SMALL_TRANSFORMER, build_small_models, small_tokens

    name = "train_small_testbed"
    tst = sys.modules.get(name)
    if tst is None:  # the script is not a package module: load it by path (as tests/testbed/test_train_small.py)
        spec_ = importlib.util.spec_from_file_location(name, ROOT / "tools" / "train_small_testbed.py")
        tst = importlib.util.module_from_spec(spec_)
        sys.modules[name] = tst  # dataclasses look their module up while the file executes
        spec_.loader.exec_module(tst)
    spec = spec or SMALL_TRANSFORMER
    scene = SMALL_SCENE
    transformer, text_encoder, vae = build_small_models(seed, spec)
    facts = {
        "name": SMALL_MODEL_ID, "frames": scene.frames, "height": scene.height, "width": scene.width,
        "latent_shape": [spec.in_channels, scene.frames, scene.height // 4, scene.width // 4],
        "tokens": small_tokens(scene), "shift": 3.0, "guidance_scale": 5.0, "recommended_steps": 50,
        "negative_prompt": "", "prompt_template": sd.PROMPT_TEMPLATE, "vocabulary": list(sd.VOCABULARY),
        "model": dataclasses.asdict(spec), "scene": dataclasses.asdict(scene), "random_weights": True,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tst.write_folder(out, Testbed(transformer.eval(), text_encoder.eval(), vae.eval(), facts))
    return out


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory):
    """A full-size wan2.1-small folder (8 blocks, width 256) with random weights, shared by the session."""
    return write_small_folder(tmp_path_factory.mktemp("small") / "wan2.1-small")
