"""CogVideoX through the command lines: profile (the recipe's default calibration), export (ONNX), run from a
prompt, verify, a Triton repository entry.

A tiny random diffusers-format CogVideoX folder (tests/models/test_cogvideox_recipe.py) stands in for the 2B
checkpoint. The export folder's ONNX Runtime sample from a prompt must equal the eager cached sampler on the
same prompt embeddings: the flow-matching view of the DDIM model (the timestep map and the scale in and out)
is baked into the graphs (tests/export/test_cogvideox_graphs.py covers a time-adjusted table).
"""

import pytest

from ertacache.cli import run as run_cli
from ertacache.cli import verify as verify_cli
from tests.cli.family_cli import export_error_vs_eager, profile_and_export

pytestmark = pytest.mark.slow  # profile + ONNX export + run + verify: ~40 s on 2 cores

# 9 frames: 3 latent frames, odd, so that AutoencoderKLCogVideoX decodes 9 frames; 10 steps: DDIM needs T | 1000
SIZE = ["--height", "32", "--width", "32", "--frames", "9", "--steps", "10"]
PROMPT = "a red cat walks on the grass"


@pytest.fixture(scope="module")
def cogvideox_export(tmp_path_factory):
    from tests.models.test_cogvideox_recipe import write_cogvideox_folder

    root = tmp_path_factory.mktemp("cogvideox-cli")
    folder = write_cogvideox_folder(root / "folder")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cat walks on the grass\na dog runs\n")
    profile_and_export("cogvideox", folder, root, SIZE, "--prompts", str(prompts))
    return root, folder


def test_the_export_folder_samples_a_prompt_like_the_eager_sampler(cogvideox_export):
    from ertacache.contract import load_manifest
    from ertacache.models.cogvideox import VPNoiseSchedule
    from ertacache.profile.artifact import load_profile

    root, folder = cogvideox_export
    manifest = load_manifest(root / "out")
    assert manifest.conditioning == ("text_embeds",) and manifest.model.id == "cogvideox"
    profile = load_profile(root / "profile.json")
    assert not all(profile.mask) and list(profile.nominal_sigmas) == list(VPNoiseSchedule().sigmas(10))
    assert export_error_vs_eager("cogvideox", folder, root, PROMPT) < 1e-4


def test_run_verify_and_triton_take_the_folder(cogvideox_export, tmp_path, capsys):
    from ertacache.serving import RepositoryConfig, write_repository

    root, folder = cogvideox_export
    rc = run_cli.main(["--engines", str(root / "out"), "--model-path", str(folder), "--prompt", PROMPT, "--seed", "2",
                       "--out", str(tmp_path / "video.gif")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "video.gif").stat().st_size > 0
    rc = verify_cli.main(["--engines", str(root / "out"), "--model-path", str(folder), "--prompt", PROMPT])
    assert rc == 0, capsys.readouterr().err
    report = write_repository(RepositoryConfig(engines=root / "out", repo=tmp_path / "repo", name="cogvideox"))
    assert [t.name for t in report.io.inputs][:2] == ["prompt", "text_embeds"]
