"""A real Triton Inference Server (the nvidia-pytriton wheel's 2.51 build) on loopback, queried with tritonclient.

The server runs the generated repository's Python-backend model.py (ONNX Runtime on the CPU inside
it); every output is compared byte for byte with the direct runtime in this process. Needs
tritonclient and nvidia-pytriton, which need numpy<2: tools/test.sh runs this folder again in
.venv-triton (tools/triton_env.sh), where they are installed.
"""

import importlib.util
import queue
import re
import shutil
import sys
import time
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np
import pytest

REASON = "needs tritonclient and nvidia-pytriton (numpy<2); tools/test.sh runs tests/serving in .venv-triton"
pytest.importorskip("tritonclient.grpc", reason=REASON)
pytest.importorskip("tritonclient.http", reason=REASON)
pytest.importorskip("pytriton", reason=REASON)

from tritonclient.utils import InferenceServerException  # noqa: E402

from ertacache.serving import RepositoryConfig, ServerConfig, TritonServer, write_repository  # noqa: E402
from ertacache.serving.client import connect, make_inputs, tensors  # noqa: E402
from ertacache.serving.server import _alive, _children  # noqa: E402
from tests.serving.conftest import MODELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a cat walks on the grass"


@pytest.fixture(scope="module")
def server(served_repo):
    repo, _ = served_repo
    with TritonServer(ServerConfig(repo=repo, explicit=True, load_models=MODELS)) as s:
        yield s


def url(server, protocol):
    return server.http_url if protocol == "http" else server.grpc_url


def infer(server, protocol, model, inputs, **kw):
    client = connect(protocol, url(server, protocol))
    try:
        return client.infer(model, inputs, **kw)
    finally:
        client.close()


def same(result, want, names=("frames", "latents")):
    return all(result.as_numpy(n).tobytes() == want[n].tobytes() for n in names)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_outputs_equal_the_direct_runtime(server, direct, protocol):
    r = infer(server, protocol, "wan", make_inputs(protocol, seed=3, prompt=PROMPT))
    assert same(r, direct("wan", 3, prompt=PROMPT))
    r = infer(server, protocol, "wan", make_inputs(protocol, seed=4, text_embeds=direct.text("wan", text_seed=1).numpy()))
    assert same(r, direct("wan", 4, text_seed=1))
    text = direct.text("tiny").numpy()
    r = infer(server, protocol, "tiny", make_inputs(protocol, seed=5, text_embeds=text, guidance=2.5))
    assert same(r, direct("tiny", 5, guidance=2.5))
    r = infer(server, protocol, "tiny_rows", tensors(protocol, {"seed": np.array([[3], [4]], np.int64),
                                                                "text_embeds": np.stack([text, text])}))
    rows = r.as_numpy("frames")
    assert rows[0].tobytes() == direct("tiny", 3)["frames"][0].tobytes()
    assert rows[1].tobytes() == direct("tiny", 4)["frames"][0].tobytes()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_flux_model_answers_with_the_direct_runtimes_bytes(server, direct, protocol):
    """FLUX's two conditioning tensors as two request inputs, through the real server."""
    text = {n: t.numpy() for n, t in direct.text("flux", text_seed=3).items()}
    r = infer(server, protocol, "flux", tensors(protocol, {"seed": np.array([4], np.int64), **text}))
    assert same(r, direct("flux", 4, text_seed=3))
    # Triton checks required inputs itself (the model's own check, the same words, is in test_instance)
    with pytest.raises(InferenceServerException, match=r"missing required input\(s\) \['pooled_prompt_embeds'\]"):
        infer(server, protocol, "flux", tensors(protocol, {"seed": np.array([4], np.int64),
                                                           "prompt_embeds": text["prompt_embeds"]}))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_image_to_video_model_answers_prompt_and_image(server, i2v_folder_export, protocol):
    """The image (UINT8 [H, W, 3], any size) goes with the prompt; the bundled text and image encoders in the
    server's model give the frames the direct runtime gives for the same prompt and image file.

    Within one level of 255, not byte for byte: the server's instance runs the CLIP image encoder and
    ONNX Runtime with its own thread count (cores / instances), and on some CPUs (seen on an AMD EPYC)
    another thread count changes a CLIP feature by one ulp (a float reduction order), which moves a
    few pixels by one level. The text-only models are compared byte for byte.
    """
    import torch

    from ertacache.models.images import load_image
    from ertacache.runtime import Runtime
    from ertacache.runtime.inputs import noise_for, text_embeds_from_prompt

    image = load_image(i2v_folder_export.image)
    r = infer(server, protocol, "i2v", make_inputs(protocol, seed=6, prompt=PROMPT, image=image))
    with Runtime(i2v_folder_export.out, "onnxruntime") as rt:
        cond = text_embeds_from_prompt(PROMPT, rt.manifest, str(i2v_folder_export.folder),
                                       image=str(i2v_folder_export.image))
        rt.sample(noise_for(rt.manifest, 6), cond)
        want = rt.decode().numpy()
    diff = np.abs(r.as_numpy("frames").astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert torch.is_tensor(cond["image_latents"])
    with pytest.raises(InferenceServerException, match="together with 'prompt'"):
        infer(server, protocol, "i2v", make_inputs(protocol, seed=6, prompt=PROMPT))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_two_expert_model_answers_with_each_experts_guidance_scale(server, direct, protocol):
    """Wan2.2 A14B (a graph pair per expert): guidance_scale and guidance_scale_2 over the wire give the direct
    runtime's bytes; a prompt is encoded by the bundled UMT5."""
    text = direct.text("a14b", text_seed=1).numpy()
    r = infer(server, protocol, "a14b", make_inputs(protocol, seed=4, text_embeds=text, guidance=5.0, guidance_2=2.0))
    assert same(r, direct("a14b", 4, text_seed=1, guidance=5.0, guidance_2=2.0))
    r = infer(server, protocol, "a14b", make_inputs(protocol, seed=4, prompt="a cat walks"))
    assert r.as_numpy("frames").shape[0] == 1 and np.isfinite(r.as_numpy("latents")).all()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_hunyuanvideo_model_encodes_the_prompt_with_its_bundled_encoders(server, hunyuan_folder_export, protocol):
    """Llama (template, mask) and CLIP in the server's model: the same bytes as the direct runtime on the prompt."""
    from ertacache.runtime import Runtime
    from ertacache.runtime.inputs import noise_for, text_embeds_from_prompt

    prompt = "a red cat walks on the grass"
    r = infer(server, protocol, "hunyuan", make_inputs(protocol, seed=2, prompt=prompt))
    with Runtime(hunyuan_folder_export.out, "onnxruntime") as rt:
        rt.sample(noise_for(rt.manifest, 2), text_embeds_from_prompt(prompt, rt.manifest, str(hunyuan_folder_export.folder)))
        want = rt.decode().numpy()
    assert r.as_numpy("frames").tobytes() == want.tobytes()


def test_the_served_config_is_the_written_one(server):
    client = connect("http", server.http_url)
    config = client.get_model_config("wan")
    client.close()
    assert [i["name"] for i in config["input"]] == ["prompt", "text_embeds", "seed", "guidance_scale"]
    assert config["output"][0]["dims"] == [1, 5, 32, 32, 3] and config["parameters"]["backend"]["string_value"] == \
        "onnxruntime"
    with urllib.request.urlopen(server.metrics_url, timeout=5) as resp:  # what an operator monitors
        assert 'nv_inference_request_success{model="wan"' in resp.read().decode()


def _bad_requests(protocol, direct):
    text = direct.text("wan").numpy()
    seed = np.array([1], np.int64)
    prompt = np.array([PROMPT.encode()], dtype=np.object_)
    return [
        ({"prompt": prompt}, "missing input 'seed'"),  # Triton 2.51 lets it through: the model refuses it
        ({"seed": seed.astype(np.float32), "prompt": prompt}, "data-type is 'FP32', but model 'wan' expects 'INT64'"),
        ({"seed": seed, "text_embeds": text[:, :, :15].copy()}, "unexpected shape for input 'text_embeds'"),
        ({"seed": seed}, r"missing input: give 'prompt' \(text\) or 'text_embeds'"),  # the model's own checks
        ({"seed": seed, "prompt": np.array([b""], dtype=np.object_)}, "empty prompt"),
        ({"seed": seed, "prompt": prompt, "guidance_scale": np.array([np.nan], np.float32)},
         "guidance_scale is nan; give a finite number"),
        ({"seed": np.array([-5], np.int64), "prompt": prompt}, r"seed -5 is out of range: give an integer in \[0, "),
        ({"seed": seed, "prompt": prompt, "text_embeds": text}, "give either 'prompt' or 'text_embeds', not both"),
    ]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_bad_request_gets_an_error_and_the_server_keeps_serving(server, direct, protocol):
    client = connect(protocol, url(server, protocol))
    try:
        for arrays, match in _bad_requests(protocol, direct):
            with pytest.raises(InferenceServerException, match=match):
                client.infer("wan", tensors(protocol, arrays))
        r = client.infer("wan", make_inputs(protocol, seed=3, prompt=PROMPT))  # the same client, the same instance
        assert same(r, direct("wan", 3, prompt=PROMPT))
    finally:
        client.close()


def _stream(server, model, inputs, cancel_after: int | None = None):
    """(responses, errors) of one decoupled request over a gRPC stream; cancel after that many responses."""
    results = queue.Queue()
    client = connect("grpc", server.grpc_url)
    client.start_stream(partial(lambda q, result, error: q.put((result, error)), results))
    client.async_stream_infer(model, inputs)
    got = []
    try:
        while True:
            result, error = results.get(timeout=60)
            got.append((result, error))
            if cancel_after is not None and len(got) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                return got
            if error is not None or result.as_numpy("frames") is not None:
                return got
    finally:
        client.stop_stream()
        client.close()


def test_decoupled_model_streams_one_progress_response_per_step(server, direct):
    got = _stream(server, "tiny_stream", make_inputs("grpc", seed=6, text_embeds=direct.text("tiny").numpy()))
    assert all(error is None for _, error in got)
    steps = [int(r.as_numpy("step")[0]) for r, _ in got[:-1]]
    assert steps == list(range(1, 9))  # 8 steps of the schedule, then the result
    assert got[-1][0].as_numpy("frames").tobytes() == direct("tiny", 6)["frames"].tobytes()


def _rss_kb(pids) -> int:
    total = 0
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return total


def _pending(server) -> int:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(int(float(v)) for v in re.findall(r"^nv_inference_pending_request_count\{[^}]*\} (\S+)", text, re.M))


def _abandon(server, direct, k: int) -> None:
    """Request k of the fault round: cancel (gRPC), cancel a stream mid-loop, or disconnect mid-request."""
    text = direct.text("wan", text_seed=k).numpy()  # 64 KB of input per request: a leak would show
    if k % 3 == 1:
        _stream(server, "tiny_stream", make_inputs("grpc", seed=k, text_embeds=direct.text("tiny").numpy()),
                cancel_after=1 + k % 4)
        return
    client = connect("grpc", server.grpc_url)
    ctx = client.async_infer("wan", make_inputs("grpc", seed=k, text_embeds=text), callback=lambda result, error: None)
    time.sleep(0.002 * (k % 5))
    if k % 3 == 0:
        ctx.cancel()
    client.close()  # k % 3 == 2: the client goes away with its request in flight


def _settle(server, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while _pending(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)


def test_cancelled_and_abandoned_requests_release_their_state(server, direct):
    """100 requests cancelled or abandoned mid-loop: nothing pending, no memory growth, exact answers after."""
    stubs = _children(server.pid)
    assert stubs, "the Python-backend stubs are the server's children"
    for k in range(30):  # warm-up: arenas and pools reach their steady size
        _abandon(server, direct, k)
    _settle(server)
    before = _rss_kb([server.pid, *stubs])
    log_before = server.log_text().count("request cancelled after step")
    for k in range(100):
        _abandon(server, direct, k)
    _settle(server)
    assert _pending(server) == 0
    grown_kb = _rss_kb([server.pid, *stubs]) - before
    stopped = server.log_text().count("request cancelled after step") - log_before
    print(f"\n[abandon] server + stubs grew {grown_kb} kB; {stopped} of 100 requests stopped mid-loop")  # pytest -s
    assert grown_kb < 4096, f"server + stubs grew by {grown_kb} kB over 100 abandoned requests (6.4 MB of inputs)"
    assert stopped > 0, "no request was stopped mid-loop: cancellation did not reach the model"
    r = infer(server, "grpc", "wan", make_inputs("grpc", seed=3, prompt=PROMPT))
    assert same(r, direct("wan", 3, prompt=PROMPT))


@pytest.mark.parametrize("fault, match", [("tamper", "onnx/cached_step.onnx does not match its sha256"),
                                          ("remove", "onnx/vae_decode.onnx is missing")])
def test_a_broken_engine_folder_fails_to_load_and_other_models_keep_serving(server, served_repo, onnx_export,
                                                                             direct, fault, match):
    repo, _ = served_repo
    name = f"tiny_{fault}"
    report = write_repository(RepositoryConfig(onnx_export.out, repo, name=name, force=True))
    onnx = report.model_dir / "1" / "engines" / "onnx"
    if fault == "tamper":
        with open(onnx / "cached_step.onnx", "r+b") as f:
            f.seek(100)
            f.write(b"\x01")
    else:
        (onnx / "vae_decode.onnx").unlink()
    client = connect("http", server.http_url)
    try:
        with pytest.raises(InferenceServerException, match=match):
            client.load_model(name)
        assert not client.is_model_ready(name)
        assert any(match.split(" ")[0] in line and name in line for line in server.log_text().splitlines())
        assert client.is_server_live() and client.is_model_ready("tiny")
        r = client.infer("tiny", make_inputs("http", seed=5, text_embeds=direct.text("tiny").numpy()))
        assert same(r, direct("tiny", 5))
    finally:
        client.close()
        shutil.rmtree(report.model_dir)


def test_a_killed_server_restarts_and_the_next_request_succeeds(onnx_export, direct, tmp_path):
    repo = tmp_path / "repo"
    write_repository(RepositoryConfig(onnx_export.out, repo, name="tiny"))
    inputs = partial(make_inputs, "http", seed=5, text_embeds=direct.text("tiny").numpy())
    with TritonServer(ServerConfig(repo=repo)) as server:
        assert same(infer(server, "http", "tiny", inputs()), direct("tiny", 5), ["frames"])
        pid, stubs = server.pid, _children(server.pid)
        server.kill()  # SIGKILL, as a crash would
        assert not _alive(pid) and stubs and not any(_alive(p) for p in stubs)
        server.start()  # the same repository and ports
        assert server.pid != pid
        assert same(infer(server, "http", "tiny", inputs()), direct("tiny", 5), ["frames"])


def test_load_tool_checks_every_output(server, onnx_export, tmp_path):
    spec = importlib.util.spec_from_file_location("triton_load", ROOT / "tools" / "triton_load.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules["triton_load"] = tool  # dataclasses resolve their module
    spec.loader.exec_module(tool)
    out = tmp_path / "load.json"
    rc = tool.main(["--url", server.grpc_url, "--model", "tiny", "--engines", str(onnx_export.out),
                    "--concurrency", "8", "--requests", "24", "--distinct-seeds", "3", "--overhead", "3",
                    "--json", str(out)])
    import json

    report = json.loads(out.read_text())
    assert rc == 0 and report["requests"] == 24 and report["errors"] == 0 and report["mismatches"] == 0
    assert report["overhead_ratio"] > 0
    assert tool.main(["--url", "8.8.8.8:8001", "--model", "tiny", "--engines", str(onnx_export.out)]) == 2
