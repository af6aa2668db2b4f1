"""Requests to a served ertacache model with ``tritonclient`` (HTTP or gRPC), as tools/triton_load.py sends them.

    client = connect("grpc", "127.0.0.1:8001")
    result = client.infer("wan2_1-tiny", make_inputs("grpc", seed=3, prompt="digit 3 moving left"))
    frames = result.as_numpy("frames")                 # (B, F, H, W, 3) uint8

tritonclient needs numpy < 2 together with nvidia-pytriton, so it lives in ``.venv-triton``
(tools/triton_env.sh), not in the project's main environment; it is imported on first use.
"""

from __future__ import annotations

import ipaddress
import socket
from types import ModuleType

import numpy as np

from ertacache.errors import UserError
from ertacache.serving.spec import GUIDANCE, GUIDANCE_2, IMAGE, PROMPT, SEED, TEXT_EMBEDS

PROTOCOLS = ("http", "grpc")


def client_module(protocol: str) -> ModuleType:
    """``tritonclient.http`` or ``tritonclient.grpc``, with the install hint when missing."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: give one of {list(PROTOCOLS)}")
    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError as e:
        raise UserError(f"tritonclient[{protocol}] is not installed here ({e}); pip install 'tritonclient[http,grpc]' "
                        "(it needs numpy<2: bash tools/triton_env.sh makes .venv-triton with it)") from None
    return module


def check_loopback(url: str) -> str:
    """Refuse a server that is not on this machine (the load tool must never load someone else's server)."""
    host = url.rsplit(":", 1)[0].strip("[]") if ":" in url else url
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        raise UserError(f"--url {url}: cannot resolve {host!r}") from None
    if not addr.is_loopback:
        raise UserError(f"--url {url} is not a loopback address ({addr}); this tool only loads a server on this "
                        "machine: use 127.0.0.1:PORT")
    return url


def connect(protocol: str, url: str, concurrency: int = 1):
    module = client_module(protocol)
    if protocol == "http":
        return module.InferenceServerClient(url, concurrency=concurrency, network_timeout=600.0,
                                            connection_timeout=600.0)
    return module.InferenceServerClient(url)


def make_inputs(protocol: str, seed: int, prompt: str | None = None, text_embeds: np.ndarray | None = None,
                guidance: float | None = None, batched: bool = False, image: np.ndarray | None = None,
                guidance_2: float | None = None) -> list:
    """The request tensors (one row; ``batched`` adds Triton's batch dim for max_batch_size > 0 models);
    ``image``: an image-to-video model's conditioning image, (H, W, 3) uint8, sent with the prompt;
    ``guidance_2``: a two-expert model's second CFG scale."""
    module = client_module(protocol)
    arrays = {SEED: np.array([seed], np.int64)}
    if prompt is not None:
        arrays[PROMPT] = np.array([prompt.encode("utf-8")], dtype=np.object_)
    if image is not None:
        arrays[IMAGE] = np.ascontiguousarray(image, np.uint8)
    if text_embeds is not None:
        arrays[TEXT_EMBEDS] = np.ascontiguousarray(text_embeds, np.float32)
    if guidance is not None:
        arrays[GUIDANCE] = np.array([guidance], np.float32)
    if guidance_2 is not None:
        arrays[GUIDANCE_2] = np.array([guidance_2], np.float32)
    return tensors(protocol, {k: (v[None] if batched else v) for k, v in arrays.items()}, module)


def tensors(protocol: str, arrays: dict[str, np.ndarray], module: ModuleType | None = None) -> list:
    """InferInputs for arbitrary arrays (the Triton data type follows the NumPy dtype; object -> BYTES)."""
    module = module or client_module(protocol)
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, arr in arrays.items():
        t = module.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        out.append(t)
    return out
