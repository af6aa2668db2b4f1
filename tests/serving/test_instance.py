"""The served model's logic without a server: outputs equal the direct runtime, every bad request refused by name."""

import numpy as np
import pytest

from ertacache.serving import ModelInstance, RequestCancelled, RequestError


@pytest.fixture(scope="module")
def instances(served_repo):
    _, reports = served_repo
    opened = {name: ModelInstance(r.model_dir / "1", r.model_config).__enter__() for name, r in reports.items()}
    yield opened
    for inst in opened.values():
        inst.__exit__(None, None, None)


def embeds(direct, name="tiny", text_seed=0):
    return direct.text(name, text_seed=text_seed).numpy()


def test_prompt_and_embeddings_equal_the_direct_runtime(instances, direct):
    got = instances["wan"].handle({"seed": np.array([3]), "prompt": np.array([b"a cat walks"], dtype=object)})
    want = direct("wan", 3, prompt="a cat walks")
    assert got["frames"].tobytes() == want["frames"].tobytes() and got["latents"].tobytes() == want["latents"].tobytes()
    got = instances["tiny"].handle({"seed": np.array([5]), "text_embeds": embeds(direct),
                                    "guidance_scale": np.array([2.5], np.float32)})
    want = direct("tiny", 5, guidance=2.5)
    assert got["frames"].tobytes() == want["frames"].tobytes()
    only = instances["tiny"].handle({"seed": np.array([5]), "text_embeds": embeds(direct)}, want=["frames"])
    assert list(only) == ["frames"]


def test_rows_of_a_batched_model_are_independent_requests(instances, direct):
    text = np.stack([embeds(direct, text_seed=0), embeds(direct, text_seed=1)])  # (rows, nb, L, D)
    got = instances["tiny_rows"].handle({"seed": np.array([[3], [4]]), "text_embeds": text})
    assert got["frames"].shape == (2, 2, 8, 8, 3)
    assert got["frames"][0].tobytes() == direct("tiny", 3, text_seed=0)["frames"][0].tobytes()
    assert got["frames"][1].tobytes() == direct("tiny", 4, text_seed=1)["frames"][0].tobytes()


@pytest.mark.parametrize("inputs, match", [
    ({"prompt": np.array([b"a cat"], dtype=object)}, "missing input 'seed'"),
    ({"seed": np.array([1])}, r"missing input: give 'prompt' \(text\) or 'text_embeds'"),
    ({"seed": np.array([1]), "prompt": np.array([b"a"], dtype=object), "text_embeds": np.zeros((2, 512, 16), np.float32)},
     "give either 'prompt' or 'text_embeds', not both"),
    ({"seed": np.array([1]), "prompt": np.array([b"   "], dtype=object)}, "empty prompt"),
    ({"seed": np.array([-1]), "prompt": np.array([b"a"], dtype=object)}, r"seed -1 is out of range: give an integer in \[0, "),
    ({"seed": np.array([1.5]), "prompt": np.array([b"a"], dtype=object)}, "'seed' has data type float64"),
    ({"seed": np.array([1]), "prompt": np.array([b"a"], dtype=object), "guidance_scale": np.array([np.nan], np.float32)},
     "guidance_scale is nan; give a finite number"),
    ({"seed": np.array([1]), "text_embeds": np.zeros((2, 512, 15), np.float32)},
     r"'text_embeds' has shape \[2, 512, 15\], this model takes \[2, 512, 16\]"),
    ({"seed": np.array([1]), "text_embeds": np.full((2, 512, 16), np.inf, np.float32)}, "NaN or Inf"),
    ({"seed": np.array([1]), "prompt": np.array([b"a"], dtype=object), "strength": np.array([1.0])},
     r"unknown input\(s\) \['strength'\]"),
    ({"seed": np.array([1, 2]), "prompt": np.array([b"a"], dtype=object)}, r"'seed' has shape \[2\], this model takes \[1\]"),
    ({"seed": np.array([1]), "prompt": np.array([b"a"], dtype=object), "guidance_scale": np.array([-5], np.float32)},
     r"guidance_scale is -5.0; give a finite number >= 0"),
    ({"seed": np.array([1]), "prompt": np.array([b"x" * 50_000], dtype=object)}, "prompt is 50000 characters long"),
    ({"seed": np.array([1]), "prompt": np.array([b"a"], dtype=object), "x" * 10_000: np.array([1.0])},
     r"unknown input\(s\) \['xxxx.*\.\.\. \(10004 characters\)"),
])
def test_bad_requests_are_refused_by_name(instances, inputs, match):
    with pytest.raises(RequestError, match=match) as err:
        instances["wan"].handle(inputs)
    assert len(str(err.value)) < 1000  # echoed input is capped


def test_a_model_without_a_text_encoder_asks_for_its_embeddings(instances):
    with pytest.raises(RequestError, match=r"missing input 'text_embeds' \(this model has no text encoder"):
        instances["tiny"].handle({"seed": np.array([1])})


def test_a_cancelled_request_stops_and_leaves_nothing_behind(instances, direct):
    tiny = instances["tiny"]
    seen = []
    with pytest.raises(RequestCancelled, match="cancelled after step 3 of 8"):
        tiny.handle({"seed": np.array([7]), "text_embeds": embeds(direct, text_seed=2)},
                    on_step=lambda done: seen.append(done) or done < 3)
    assert seen == [1, 2, 3]
    # the next request is exact: nothing of the cancelled one (latents, residual, text) leaks into it
    got = tiny.handle({"seed": np.array([5]), "text_embeds": embeds(direct)}, on_step=lambda done: True)
    assert got["frames"].tobytes() == direct("tiny", 5)["frames"].tobytes()


def test_missing_engine_file_fails_the_load_naming_it(served_repo, tmp_path):
    import shutil

    _, reports = served_repo
    report = reports["tiny"]
    version = shutil.copytree(report.model_dir / "1", tmp_path / "1")
    (version / "engines" / "onnx" / "cached_step.onnx").unlink()
    with pytest.raises(Exception, match="onnx/cached_step.onnx is missing"):
        ModelInstance(version, report.model_config).__enter__()


def test_a_stale_model_file_is_refused_with_the_command_to_regenerate(served_repo, tmp_path):
    import shutil

    from ertacache.errors import UserError
    from ertacache.serving.server import ServerConfig

    repo, reports = served_repo
    copy = shutil.copytree(repo, tmp_path / "repo")
    ServerConfig(repo=copy)  # as written: accepted
    model_py = copy / "tiny" / "1" / "model.py"
    model_py.write_text(model_py.read_text() + "\n# edited by another ertacache version\n")
    with pytest.raises(UserError, match=r"differs from the model.py of the installed ertacache .* regenerate it with "
                                        r"ertacache-triton --engines EXPORT_FOLDER --repo .* --name tiny --force"):
        ServerConfig(repo=copy)


def test_the_instance_refuses_a_swapped_export_folder(served_repo, onnx_export, tmp_path):
    """The model records the digest of the folder it was written from; a folder swapped in later is refused."""
    import json
    import shutil

    from ertacache.errors import UserError

    _, reports = served_repo
    report = reports["wan"]
    version = shutil.copytree(report.model_dir / "1", tmp_path / "1")
    assert report.parameters["digest"].startswith("sha256:")
    shutil.rmtree(version / "engines")
    shutil.copytree(onnx_export.out, version / "engines")  # a valid folder, but not this model's
    config = json.loads(json.dumps(report.model_config))
    with pytest.raises(UserError, match="not the pinned"):
        ModelInstance(version, config).__enter__()


def test_a_k3_predictor_folder_serves_what_the_runtime_returns(onnx_export_k3, tmp_path):
    """The served model follows K through the runtime: same bytes as the direct runtime, same served I/O as K = 1."""
    import torch

    from ertacache.runtime import Runtime
    from ertacache.runtime.inputs import noise_for
    from ertacache.serving import RepositoryConfig, write_repository

    report = write_repository(RepositoryConfig(engines=onnx_export_k3.out, repo=tmp_path / "repo", name="k3",
                                               latents=True))
    assert not [t.name for t in (*report.io.inputs, *report.io.outputs) if "residual" in t.name]
    text = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    with Runtime(onnx_export_k3.out, "onnxruntime") as rt:
        assert len(rt.state.residuals) == 3
        want = rt.sample(noise_for(rt.manifest, 7), text).numpy().copy()
    with ModelInstance(report.model_dir / "1", report.model_config) as inst:
        assert len(inst.runtime.state.residuals) == 3
        got = inst.handle({"seed": np.array([7]), "text_embeds": text.numpy()})
    assert got["latents"].tobytes() == want.tobytes()


def test_a_flux_folder_takes_each_conditioning_tensor_as_an_input(instances, direct, served_repo):
    """Several conditioning tensors: one required input each, no prompt; the outputs are the runtime's bytes."""
    from ertacache.serving.spec import expected_io

    _, reports = served_repo
    assert [t.name for t in reports["flux"].io.inputs] == ["prompt_embeds", "pooled_prompt_embeds", "seed"]
    text = {n: t.numpy() for n, t in direct.text("flux", text_seed=2).items()}
    got = instances["flux"].handle({"seed": np.array([9]), **text})
    want = direct("flux", 9, text_seed=2)
    assert got["frames"].shape == (1, 1, 64, 64, 3)  # an image is a one-frame video
    assert got["latents"].tobytes() == want["latents"].tobytes() and got["frames"].tobytes() == want["frames"].tobytes()
    with pytest.raises(RequestError, match=r"missing input\(s\) \['pooled_prompt_embeds'\]"):
        instances["flux"].handle({"seed": np.array([9]), "prompt_embeds": text["prompt_embeds"]})
    with pytest.raises(RequestError, match=r"'pooled_prompt_embeds' has shape \[1, 11\], this model takes \[1, 12\]"):
        instances["flux"].handle({"seed": np.array([9]), **text, "pooled_prompt_embeds": np.zeros((1, 11), np.float32)})
    # with a bundled text encoder (a model with a recipe, e.g. flux-tiny) a prompt replaces both tensors
    io = expected_io(instances["flux"].manifest, prompt=True, latents=True, max_batch_size=0, decoupled=False)
    assert [(t.name, t.optional) for t in io.inputs] == [("prompt", True), ("prompt_embeds", True),
                                                         ("pooled_prompt_embeds", True), ("seed", False)]


def test_a_two_expert_folder_takes_a_guidance_scale_per_expert(instances, direct, served_repo):
    """Wan2.2 A14B: guidance_scale and guidance_scale_2 (optional) reach each expert's graph pair; given alone,
    guidance_scale sets both, as in WanPipeline. The bytes are the direct runtime's."""
    _, reports = served_repo
    names = [t.name for t in reports["a14b"].io.inputs]
    assert names == ["prompt", "text_embeds", "seed", "guidance_scale", "guidance_scale_2"]
    assert "guidance_scale_2" not in [t.name for t in reports["wan"].io.inputs]
    text = embeds(direct, "a14b", text_seed=3)
    inst = instances["a14b"]
    for extra, want in (({}, direct("a14b", 2, text_seed=3)),
                        ({"guidance_scale": np.array([5.0], np.float32)},
                         direct("a14b", 2, text_seed=3, guidance=5.0, guidance_2=5.0)),
                        ({"guidance_scale": np.array([5.0], np.float32), "guidance_scale_2": np.array([2.0], np.float32)},
                         direct("a14b", 2, text_seed=3, guidance=5.0, guidance_2=2.0))):
        got = inst.handle({"seed": np.array([2]), "text_embeds": text, **extra})
        assert got["latents"].tobytes() == want["latents"].tobytes(), extra
    plain = direct("a14b", 2, text_seed=3)["latents"]
    assert np.abs(plain - direct("a14b", 2, text_seed=3, guidance_2=1.5)["latents"]).max() > 1e-4
    with pytest.raises(RequestError, match="guidance_scale_2 is -1.0; give a finite number >= 0"):
        inst.handle({"seed": np.array([2]), "text_embeds": text, "guidance_scale_2": np.array([-1.0], np.float32)})
    with pytest.raises(RequestError, match=r"unknown input\(s\) \['guidance_scale_2'\]"):
        instances["tiny"].handle({"seed": np.array([2]), "text_embeds": embeds(direct),
                                  "guidance_scale_2": np.array([2.0], np.float32)})
