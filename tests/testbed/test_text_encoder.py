import pytest
import torch

from ertacache.testbed import TinyTextEncoder


def test_encode_shape_dtype_and_determinism():
    enc = TinyTextEncoder(max_length=8, embed_dim=32)
    a = enc.encode(["digit 3 moving left", ""])
    b = enc.encode(["digit 3 moving left", ""])
    assert a.shape == (2, 8, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # empty prompt differs from a real one


def test_empty_prompt_is_all_padding():
    enc = TinyTextEncoder()
    assert enc.tokenize([""]).eq(0).all()


def test_unknown_word_names_word_and_vocabulary():
    enc = TinyTextEncoder()
    with pytest.raises(ValueError) as err:
        enc.encode(["digit 3 moving sideways"])
    msg = str(err.value)
    assert "sideways" in msg and "left" in msg and "digit" in msg


def test_too_long_prompt_rejected():
    with pytest.raises(ValueError):
        TinyTextEncoder(max_length=4).encode(["digit 3 moving left left"])


def test_save_load_round_trip(tmp_path):
    enc = TinyTextEncoder(embed_dim=16, seed=3)
    with torch.no_grad():
        enc.token_embedding.add_(1.0)  # make sure trained values, not the init, travel
    enc.save_pretrained(tmp_path / "text_encoder")
    back = TinyTextEncoder.from_pretrained(tmp_path, subfolder="text_encoder")
    assert list(back.config.vocab) == list(enc.config.vocab)
    prompts = ["digit 7 moving up", ""]
    assert torch.equal(enc.encode(prompts), back.encode(prompts))
