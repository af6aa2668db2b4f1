"""Model adapters: split a diffusion transformer's forward into pre / blocks / head.

Feature caching needs three pieces of a forward pass that the model class
does not expose on its own (DESIGN.md, section 1):

    h_in = pre(x_t, t, text)          # patch embedding, rope, timestep/text conditioning
    h    = blocks(h_in, ...)          # the stack a cached step skips
    v    = head(h, t)                 # norm_out + timestep modulation + proj_out + unpatchify

An adapter reads the model's own submodules (it never changes weights or the
class) and is registered under the model's class name, the way diffusers'
``TransformerBlockRegistry`` keys block metadata by class. Supporting a new
model family means writing one adapter class and decorating it with
:func:`register_adapter`, next to the family's
:class:`~ertacache.models.family.ModelFamily` entry (e.g. :mod:`ertacache.models.wan`);
nothing else in the package branches on the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ertacache.errors import UserError

_ADAPTERS: dict[str, type["ModelAdapter"]] = {}


def bind_call(names: tuple[str, ...], args: tuple, kwargs: dict, ignored: tuple[str, ...] = (),
              owner: str = "this model") -> dict[str, Any]:
    """A forward's positional and keyword arguments by name (``names`` in the forward's order).

    ``ignored`` arguments may be given empty only (None, False, {}): the adapter mirrors the forward
    without them, so a value there (image conditioning, ControlNet residuals, attention kwargs) is
    refused instead of silently dropped. Any other name is an error too.
    """
    if len(args) > len(names):
        raise TypeError(f"{owner}'s forward takes at most {len(names)} positional arguments, got {len(args)}")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in bound:
            raise TypeError(f"{owner}'s forward got {key!r} twice")
        if key in ignored:
            if not (value is None or value is False or (isinstance(value, dict) and not value)):
                raise UserError(f"{owner}: the ERTACache hook does not support {key!r} (it mirrors the plain "
                                "text-conditioned forward); call the pipeline without it")
            continue
        if key not in names:
            raise TypeError(f"{owner}'s forward got an unexpected argument {key!r}")
        bound[key] = value
    return bound


def register_adapter(class_name: str) -> Callable[[type["ModelAdapter"]], type["ModelAdapter"]]:
    """Register an adapter class for transformers whose class is named ``class_name``."""

    def decorator(cls: type["ModelAdapter"]) -> type["ModelAdapter"]:
        _ADAPTERS[class_name] = cls
        return cls

    return decorator


def adapter_for(model: nn.Module) -> "ModelAdapter":
    """Return the adapter that knows how to split ``model``'s forward."""
    from ertacache.models.family import _load_builtins

    _load_builtins()  # the built-in family modules register their adapters on import
    name = type(model).__name__
    if name not in _ADAPTERS:
        raise UserError(
            f"No ERTACache adapter for model class {name!r}. Supported classes: "
            f"{sorted(_ADAPTERS)}. Add one with @register_adapter({name!r}) in ertacache/models/."
        )
    return _ADAPTERS[name](model)


def adapter_list(adapter: "ModelAdapter | Sequence[ModelAdapter]") -> list["ModelAdapter"]:
    """One adapter per expert, in order: ``adapter`` itself as a one-element list for a one-transformer model,
    the given list or tuple for a two-expert one (Wan2.2 A14B)."""
    return list(adapter) if isinstance(adapter, (list, tuple)) else [adapter]


@dataclass
class PreOutput:
    """What `pre` hands to `blocks` and `head`.

    ``block_inputs`` is None for a cached step: a cached step needs only the
    tokens (to add the stored residual to) and the timestep embedding (for the
    head), not the rope tables, the text projection or the per-block modulation.
    """

    hidden: torch.Tensor  # (B, N, D) tokens entering the block stack
    head_inputs: Any  # adapter-specific, consumed by `head` (e.g. temb and the token grid)
    block_inputs: Any | None  # adapter-specific, consumed by `blocks`; None on cached steps


@dataclass
class TransformerCall:
    """One call of the transformer as a diffusers pipeline makes it, in the adapter's terms.

    What a pipeline hook (:mod:`ertacache.integrations.diffusers_pipeline`) needs to run a full or a
    cached step through the adapter instead of the model's forward: the pipeline's arguments may be
    in another layout (FLUX passes packed tokens), so the adapter translates them and says how to
    translate the velocity back.
    """

    latents: torch.Tensor  # in the adapter's layout: (rows, C, F, H, W) video, (rows, C, H, W) image
    timestep: torch.Tensor  # (rows,) as the model takes it (sigma x the family's timestep scale); (rows, N) per token
    cond: Any  # what a full step's ``pre`` reads (a tensor, or a mapping by conditioning name)
    cached_cond: Any  # what a cached step's ``pre`` reads (None, or the mapping of the cached_step inputs)
    to_output: Callable[[torch.Tensor], torch.Tensor]  # velocity in the adapter's layout -> the forward's


class ModelAdapter:
    """Base class: subclasses implement the three pieces for one model family.

    Everything else about the family (latent layout, conditioning, timestep scale, sigmas,
    guidance, export rewrites, loading) is data in its :class:`~ertacache.models.family.ModelFamily`,
    reached through :attr:`family`.
    """

    #: attribute holding the latent channel count in the model config
    in_channels_key: ClassVar[str] = "in_channels"

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def in_channels(self) -> int:
        return int(self.model.config[self.in_channels_key])

    @property
    def patch_size(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def family(self):
        """The model's :class:`~ertacache.models.family.ModelFamily` (its base family, looked up by class)."""
        from ertacache.models.family import family_for_model

        return family_for_model(self.model)

    def pre(self, latents: torch.Tensor, timestep: torch.Tensor, text) -> PreOutput:
        """Embed the latent video (and, unless ``text`` is None, everything the blocks need).

        ``text``: one conditioning tensor (Wan) or, for a family with several conditioning inputs or
        an embedded guidance scale (FLUX), a mapping of them; on a cached step it is None or the
        mapping of the inputs the family marks ``cached_step`` (:mod:`ertacache.sampling.steps`).
        """
        raise NotImplementedError

    def modulated_input(self, pre: PreOutput) -> torch.Tensor:
        """The first block's timestep-modulated input (for TeaCache-style baselines)."""
        raise NotImplementedError

    def blocks(self, pre: PreOutput) -> torch.Tensor:
        """Run the transformer block stack; returns hidden states shaped like ``pre.hidden``."""
        raise NotImplementedError

    def head(self, hidden: torch.Tensor, pre: PreOutput) -> torch.Tensor:
        """Map block-stack output back to a velocity shaped like the latents."""
        raise NotImplementedError

    def own_sigmas(self, steps: int):
        """The nominal sigma table the *loaded model* fixes for ``steps`` steps (CogVideoX: its checkpoint's DDIM
        schedule), or None when the table is a setting of the request (the flow-matching families' shift).

        The export pass compares a profile's nominal table with it: graphs baked from this model must run the
        table the profile was calibrated on.
        """
        return None

    def bind_pipeline(self, pipe) -> None:
        """Read what the adapter needs from the diffusers pipeline ``enable_ertacache`` hooks (CogVideoX: its
        scheduler's noise schedule); nothing for most families."""

    def transformer_call(self, *args, **kwargs) -> TransformerCall:
        """The model's forward arguments (without ``return_dict``) as a :class:`TransformerCall`.

        The one place that knows the diffusers forward's signature, so the pipeline hook works for
        every family. Arguments the adapter does not mirror (image conditioning, ControlNet residuals)
        are refused rather than dropped.
        """
        raise UserError(f"the {type(self).__name__} adapter does not translate pipeline calls; the diffusers "
                        "integration needs ModelAdapter.transformer_call (docs/families.md)")

    def model_forward(self, latents: torch.Tensor, timestep: torch.Tensor, text) -> torch.Tensor:
        """The model's *own* forward, called as its diffusers pipeline calls it, velocity in the adapter's layout.

        The inverse of :meth:`transformer_call`: what peer caching libraries need, since their hooks
        sit on the model's blocks and expect the pipeline's call (``text`` as :meth:`pre` takes it).
        """
        raise UserError(f"the {type(self).__name__} adapter cannot call its model as the pipeline does; the peer "
                        "harness needs ModelAdapter.model_forward (docs/families.md)")

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``head(blocks(pre(...)))``: must equal the model's own forward."""
        pre = self.pre(latents, timestep, text)
        return self.head(self.blocks(pre), pre)
