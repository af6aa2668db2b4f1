"""The wan2.1-small text path: the tiny testbed's encoder class with a vocabulary covering every attribute."""

import pytest
import torch

from ertacache.errors import UserError
from ertacache.testbed import scene_data as sd
from ertacache.testbed.small import TEXT_LENGTH, build_small_models, small_tokens
from ertacache.testbed.text_encoder import TinyTextEncoder, UnknownWordError


@pytest.fixture(scope="module")
def encoder():
    return build_small_models(seed=0)[1]


def test_vocabulary_covers_every_prompt_and_attribute(encoder):
    vocab = set(encoder.config.vocab)
    for values in (sd.COLOURS, sd.SHAPES, sd.DIRECTIONS, sd.BACKGROUNDS):
        assert set(values) <= vocab
    emb = encoder.encode(sd.all_prompts())
    assert emb.shape == (128, TEXT_LENGTH, encoder.config.embed_dim) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()


def test_each_attribute_changes_the_embedding(encoder):
    base = "red circle moving left on flower"
    others = ["green circle moving left on flower", "red cross moving left on flower",
              "red circle moving up on flower", "red circle moving left on temple", ""]
    e = encoder.encode([base, *others])
    for i in range(1, len(others) + 1):
        assert not torch.allclose(e[0], e[i])


def test_unknown_word_is_a_user_error_listing_the_vocabulary(encoder):
    with pytest.raises(UnknownWordError) as err:
        encoder.encode(["purple circle moving left on flower"])
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "'purple'" in msg
    for word in (*sd.COLOURS, *sd.SHAPES, *sd.DIRECTIONS, *sd.BACKGROUNDS):
        assert word in msg


def test_too_long_prompt_is_a_user_error(encoder):
    with pytest.raises(UserError, match="at most"):
        encoder.encode(["red circle moving left on flower on temple red"])


def test_save_load_round_trip_keeps_the_vocabulary(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "text_encoder")
    back = TinyTextEncoder.from_pretrained(tmp_path, subfolder="text_encoder")
    assert list(back.config.vocab) == list(encoder.config.vocab)
    prompts = ["yellow triangle moving down on temple", ""]
    assert torch.equal(back.encode(prompts), encoder.encode(prompts))


def test_token_count_meets_the_realistic_regime_floor():
    assert small_tokens() >= 512
