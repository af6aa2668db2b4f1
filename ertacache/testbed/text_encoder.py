"""A word-level text encoder small enough to train together with the testbed model.

Real Wan2.1 uses umT5 (4096-wide, 512 tokens). The testbed keeps the same contract
(prompt list in, float32 (B, L, D) out, "" is the unconditional prompt) with a
vocabulary of 19 words, so that the caching code exercises a real text path while
the whole model still trains on 2 CPU cores.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ertacache.errors import PromptError, brief

PAD = "<pad>"
DEFAULT_VOCAB: tuple[str, ...] = (
    PAD, "digit", "moving", *[str(d) for d in range(10)], "left", "right", "up", "down",
)


#: the testbed's name for a prompt its encoder cannot read (a UserError and a ValueError, see PromptError)
UnknownWordError = PromptError


class TinyTextEncoder(ModelMixin, ConfigMixin):
    """Token + position embeddings, plus a bag-of-words summary mixed into every token, then LayerNorm.

    The summary (a linear map of the mean word embedding) matters for training speed:
    without it the digit and direction live in two of eight tokens and the
    transformer's cross-attention needs thousands of steps to learn to find them;
    with it every text token already carries the whole prompt.

    The vocabulary lives in the config so a saved folder fully describes the
    tokenizer; unknown words are rejected instead of silently mapped, because a
    typo in a calibration prompt would otherwise produce a plausible-looking but
    wrong profile.
    """

    @register_to_config
    def __init__(self, vocab: list[str] | tuple[str, ...] = DEFAULT_VOCAB, max_length: int = 8,
                 embed_dim: int = 32, seed: int = 0):
        super().__init__()
        vocab = list(vocab)
        if not vocab or vocab[0] != PAD:
            raise ValueError(f"vocab must start with {PAD!r}, got {vocab[:3]!r}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate words")
        if max_length <= 0 or embed_dim <= 0:
            raise ValueError("max_length and embed_dim must be positive")
        self._index = {w: i for i, w in enumerate(vocab)}
        gen = torch.Generator().manual_seed(seed)  # deterministic init before training
        self.token_embedding = nn.Parameter(torch.randn(len(vocab), embed_dim, generator=gen))
        self.position_embedding = nn.Parameter(0.1 * torch.randn(max_length, embed_dim, generator=gen))
        self.mix = nn.Linear(embed_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Word ids (B, L), right-padded with the pad id 0."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        ids = torch.zeros(len(prompts), self.config.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.strip().lower().split()
            if len(words) > self.config.max_length:
                raise PromptError(f"prompt {brief(prompt)} has {len(words)} words; this text encoder takes at most "
                                  f"{self.config.max_length}")
            for col, word in enumerate(words):
                if word not in self._index or word == PAD:
                    known = [w for w in self.config.vocab if w != PAD]
                    raise PromptError(f"unknown word {brief(word, 40)} in prompt {brief(prompt)}; this text encoder "
                                      f"knows: {' '.join(known)}")
                ids[row, col] = self._index[word]
        return ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) float32 embeddings."""
        tok = self.token_embedding[input_ids]  # (B, L, D)
        words = (input_ids != 0).unsqueeze(-1).float()  # (B, L, 1), 0 on padding
        pooled = (tok * words).sum(1) / words.sum(1).clamp_min(1.0)  # (B, D); zeros for ""
        x = tok + self.position_embedding[None] + self.mix(pooled).unsqueeze(1)  # (B, L, D)
        return self.norm(x)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> float32 (B, L, D) on the module's device; "" is the unconditional prompt."""
        ids = self.tokenize(prompts).to(self.token_embedding.device)
        return self.forward(ids).float()


class PooledPromptEncoder:
    """A :class:`TinyTextEncoder` behind FLUX's two conditioning inputs (the ``flux-tiny`` testbed's text path).

    FLUX reads a token sequence (``prompt_embeds``, T5's role) and one pooled vector
    (``pooled_prompt_embeds``, CLIP's role) that enters the timestep embedding. The testbed
    takes both from one small encoder: the states, and their mean over the prompt's words.
    Training and every stage after it call this same function, so the pooled vector cannot drift.
    """

    def __init__(self, text_encoder: TinyTextEncoder):
        self.text_encoder = text_encoder  # the attribute name ertacache.models.loading moves to the device

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.text_encoder.tokenize(prompts).to(self.text_encoder.token_embedding.device)  # (B, L)
        states = self.text_encoder(ids).float()  # (B, L, D)
        words = (ids != 0).unsqueeze(-1).float()  # (B, L, 1), 0 on padding
        pooled = (states * words).sum(1) / words.sum(1).clamp_min(1.0)  # (B, D)
        return {"prompt_embeds": states, "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> the two conditioning tensors, float32, by FLUX's input names."""
        return self(list(prompts))
