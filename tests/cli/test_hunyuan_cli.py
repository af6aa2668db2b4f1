"""HunyuanVideo through the command lines: profile, export (ONNX), run from a prompt, a Triton repository entry.

A tiny random diffusers-format HunyuanVideo folder (tests/models/test_hunyuan_recipe.py) stands in for
the 13B checkpoint: the CLIs take it with ``--model hunyuanvideo --model-path``, and the export folder's
ONNX Runtime sample from a prompt must equal the eager cached sampler on the same prompt embeddings.
"""

import pytest

from ertacache.cli import run as run_cli
from tests.cli.family_cli import export_error_vs_eager, profile_and_export

pytestmark = pytest.mark.slow  # profile + ONNX export + run: ~20 s on 2 cores

SIZE = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "8"]


@pytest.fixture(scope="module")
def hunyuan_export(tmp_path_factory):
    from tests.models.test_hunyuan_recipe import write_hunyuan_folder

    root = tmp_path_factory.mktemp("hunyuan-cli")
    folder = write_hunyuan_folder(root / "folder")
    profile_and_export("hunyuanvideo", folder, root, SIZE)
    return root, folder


def test_the_export_folder_samples_a_prompt_like_the_eager_sampler(hunyuan_export):
    from ertacache.contract import load_manifest

    root, folder = hunyuan_export
    assert load_manifest(root / "out").conditioning == ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
    assert export_error_vs_eager("hunyuanvideo", folder, root, "a red cat walks on the grass") < 1e-4


def test_run_from_a_prompt_writes_a_video_and_triton_takes_the_folder(hunyuan_export, tmp_path, capsys):
    from ertacache.serving import RepositoryConfig, write_repository

    root, _ = hunyuan_export
    rc = run_cli.main(["--engines", str(root / "out"), "--prompt", "a red cat", "--seed", "2",
                       "--out", str(tmp_path / "video.gif")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "video.gif").stat().st_size > 0
    report = write_repository(RepositoryConfig(engines=root / "out", repo=tmp_path / "repo", name="hunyuan"))
    names = [t.name for t in report.io.inputs]
    assert names == ["prompt", "prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds", "seed"]
    assert (tmp_path / "repo" / "hunyuan" / "1" / "text_encoder" / "text_encoder_2" / "config.json").exists()
