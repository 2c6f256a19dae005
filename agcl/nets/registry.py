"""Name -> builder registry for segmentation nets, and the encoder/decoder container they return.

Every registered builder has the signature ``builder(in_channels, num_classes, **kw) -> nn.Module``
and returns a module with the uniform interface that methods and the engine rely on:

- ``forward(x)`` -> logits (B, C, *spatial), same spatial size as ``x``;
- ``forward_features(x)`` -> (logits, features), features = last decoder map before the output conv;
- ``forward_all(x)`` -> one logits tensor per decoder (``forward`` uses the first only);
- ``encode(x)`` -> the encoder's skip features (finest first, bottleneck last) and
  ``decode(skips, decoder=0)`` -> (logits, features): the two halves of ``forward_features``, for
  methods that perturb features between them (UniMatch's feature dropout) or share one encoding
  between decoders; ``decode(encode(x))`` computes exactly what ``forward_features(x)`` does;
- attributes ``spatial_dims``, ``num_decoders``, ``feature_channels``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

# Four 2x downsamplings: every spatial size must divide by 16 so that additive/concat skips align.
SIZE_MULTIPLE = 16
_REQUIRED_ATTRS = ("spatial_dims", "num_decoders", "feature_channels", "forward_features",
                   "forward_all", "encode", "decode")

Builder = Callable[..., nn.Module]
_NETS: dict[str, Builder] = {}


def register_net(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(in_channels, num_classes, **kw)`` under ``name``."""

    def decorator(builder: Builder) -> Builder:
        if name in _NETS:
            raise ValueError(
                f"net {name!r} is already registered (by {_NETS[name].__module__}."
                f"{_NETS[name].__qualname__}); pick another name"
            )
        _NETS[name] = builder
        return builder

    return decorator


def list_nets() -> list[str]:
    return sorted(_NETS)


def check_kwargs(name: str, kwargs: dict, where: str = "net") -> None:
    """Raise ValueError naming `where` when `kwargs` has a key the builder of `name` does not take."""
    if name not in _NETS:
        raise KeyError(f"unknown net {name!r}; known nets: {', '.join(list_nets()) or '(none)'}")
    params = inspect.signature(_NETS[name]).parameters
    accepted = sorted(k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: net {name!r} has no option {', '.join(unknown)} "
                         f"(its options: {', '.join(accepted) or 'none'})")


def build(name: str, in_channels: int, num_classes: int, **kw) -> nn.Module:
    """Build the net registered as ``name``; unknown names raise KeyError listing the known ones."""
    if name not in _NETS:
        raise KeyError(f"unknown net {name!r}; known nets: {', '.join(list_nets()) or '(none)'}")
    net = _NETS[name](in_channels, num_classes, **kw)
    missing = [attr for attr in _REQUIRED_ATTRS if not hasattr(net, attr)]
    if missing:
        raise TypeError(f"net {name!r} lacks the net interface: missing {', '.join(missing)}")
    return net


def check_input(x: torch.Tensor, in_channels: int, spatial_dims: int) -> None:
    """Fail early with a readable message instead of a shape error deep inside a skip connection."""
    expected_ndim = spatial_dims + 2
    if x.ndim != expected_ndim or x.shape[1] != in_channels:
        raise ValueError(
            f"net input: expected shape (B, {in_channels}, {', '.join('S' * spatial_dims)}) "
            f"({expected_ndim} dims), got {tuple(x.shape)}"
        )
    spatial = tuple(x.shape[2:])
    if any(size % SIZE_MULTIPLE for size in spatial):
        raise ValueError(
            f"net input: every spatial size must be a multiple of {SIZE_MULTIPLE}, got {spatial}"
        )


class EncoderDecoder(nn.Module):
    """One encoder shared by one or more decoders (a single decoder for V-Net / U-Net).

    ``encoder(x)`` returns the list of skip features (finest first, bottleneck last);
    each decoder maps that list to ``(logits, features)``.
    """

    def __init__(self, encoder: nn.Module, decoders: Sequence[nn.Module], *, in_channels: int,
                 spatial_dims: int, feature_channels: int):
        super().__init__()
        if not decoders:
            raise ValueError("EncoderDecoder needs at least one decoder")
        self.encoder = encoder
        self.decoders = nn.ModuleList(decoders)
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.feature_channels = feature_channels
        self.num_decoders = len(self.decoders)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x, self.in_channels, self.spatial_dims)
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The skip features of `x` (input checked), finest first, bottleneck last."""
        return self._encode(x)

    def decode(self, skips: list[torch.Tensor], decoder: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) of decoder `decoder` from skip features (encode's, or perturbed)."""
        return self.decoders[decoder](skips)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoders[0](self._encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = self._encode(x)
        return [decoder(skips)[0] for decoder in self.decoders]
