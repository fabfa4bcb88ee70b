"""Keys inside the network: signed channel permutations folded into the weights.

The input key (shuffle, negpos) of a block-aligned model is folded into its first layer, so a thief who
re-learns that one layer from a few labelled images gets the rest of the network for free (docs/attacks.md).
An inner key spreads the secret over the network: at each keyed point the next layer reads its input
channels permuted and sign-flipped, ``layer(Q a)`` with ``(Q a)[:, j] = s_j * a[:, p_j]``.

``layer(Q a)`` is exactly ``layer'(a)`` with the layer's input columns relabelled, ``W'[:, p_j] = s_j W[:, j]``
(DESIGN.md section 5). Random initialisation, SGD with momentum, AdamW and weight decay are invariant under
that relabelling, so a model trained with the key and a model trained plain, then folded, have the same
distribution of stored weights. blockkey therefore never gathers a feature map:

- the key holder's model in memory is the *plain* network (no op on the hot path: training, evaluation,
  prediction and export run at the speed of a model without the key);
- every file on disk stores the *folded* weights (``W`` above): :func:`stored_state_dict`;
- :func:`use_inner_key` moves a model between the two (``None``: the folded, stored form, what a thief
  without the key runs).

Where a model's points are: every dense convolution or linear layer after the first one (the first reads
the image; the input key protects it). The point is named after that layer, except in the block-aligned
families (``patchnet``, ``upnet``, ``fullnet``), whose class declares its points under the names of the
keyed-point modules of version 0.1 (:meth:`blockkey.models.PatchNet.inner_points`), so keys and runs made
then keep their meaning. The permutation and signs of a point derive from the key's 256-bit secret and the
point's name and width (:meth:`blockkey.keys.InnerKey.point`).

    key = KeySet.generate("shuffle,negpos,inner", block_size=4)
    model = create_model("fullnet", 10, patch=4)
    use_inner_key(model, key)        # the weights now compute as the key holder's (plain) network
    stored_state_dict(model)         # what a checkpoint holds: the folded weights
    use_inner_key(model, None)       # the folded form in memory: what a thief without the key runs

:class:`ChannelKey` is the explicit keyed-point module (a gather in the forward pass): the reference
semantics that the fold reproduces, the attacks' view of a stolen model (:func:`with_keyed_points`), and
the modules of models built with ``inner=True`` by version 0.1 (left at identity: their weights are folded).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .errors import BlockkeyError

if TYPE_CHECKING:
    from .keys import InnerKey, KeySet

__all__ = [
    "ChannelKey",
    "Point",
    "current_inner_key",
    "dense_points",
    "fold_optimizer_tensors",
    "fold_tensor",
    "inner_points",
    "keyed_points",
    "load_stored_state_dict",
    "model_points",
    "refold_inner",
    "set_points",
    "stored_state_dict",
    "use_inner_key",
    "view_points",
    "with_keyed_points",
]

_ATTR = "_blockkey_inner_key"  # the inner key the model's weights are currently unfolded with (None: stored)


@dataclass(frozen=True)
class Point:
    """A keyed point: ``consumer`` (a module name) reads its input with ``channels`` channels relabelled.

    ``name`` is the label the key's permutation derives from; ``signs=False`` keeps every sign (points that
    version 0.1 put in front of a max pool).
    """

    name: str
    consumer: str
    channels: int
    signs: bool = True


class ChannelKey(nn.Module):
    """``out[..., j, ...] = sign_j * in[..., perm_j, ...]`` over ``dim``; identity until a key is set.

    ``signs=False`` keeps every sign. Permutation and signs are non-persistent buffers: they never reach a
    state dict.
    """

    # buffers (registered in __init__)
    perm: Tensor
    sign: Tensor

    def __init__(self, channels: int, signs: bool = True, dim: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.signs = signs
        self.dim = dim
        self.register_buffer("perm", torch.arange(channels), persistent=False)
        self.register_buffer("sign", torch.ones(channels), persistent=False)
        self.keyed = False

    def set(self, perm: torch.Tensor | None, sign: torch.Tensor | None = None) -> None:
        """Set the point's permutation and signs (``None``: identity)."""
        if perm is None:
            self.perm.copy_(torch.arange(self.channels))
            self.sign.fill_(1.0)
            self.keyed = False
            return
        if sorted(perm.tolist()) != list(range(self.channels)):
            raise BlockkeyError(
                f"a keyed point of {self.channels} channels needs a permutation of 0..{self.channels - 1}"
            )
        self.perm.copy_(perm)
        self.sign.copy_(sign if sign is not None else torch.ones(self.channels))
        self.keyed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.keyed:
            return x
        dim = self.dim % x.dim()
        shape = [1] * x.dim()
        shape[dim] = -1
        return x.index_select(dim, self.perm) * self.sign.to(x.dtype).view(shape)

    def extra_repr(self) -> str:  # never the permutation: it is the key
        return f"{self.channels}, signs={self.signs}, keyed={self.keyed}"


# --------------------------------------------------------------------------------------------
# Where a model's points are
# --------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The module that holds the layers, and the state-dict prefix of its wrappers (DDP, EMA, compile)."""
    prefix = ""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model, prefix = model._orig_mod, prefix + "_orig_mod."  # type: ignore[assignment]
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, AveragedModel
            model, prefix = model.module, prefix + "module."  # type: ignore[assignment]
        else:
            return model, prefix


def _dense(m: nn.Module) -> bool:
    """A layer whose weight's dim 1 is its input channels, each column read by every output."""
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups == 1


def dense_points(model: nn.Module) -> tuple[Point, ...]:
    """The default declaration: every dense convolution or linear layer after the first (in module order),
    named after the layer."""
    layers = [(name, m) for name, m in model.named_modules() if _dense(m)]
    return tuple(Point(name, name, int(m.weight.shape[1])) for name, m in layers[1:])


def model_points(model: nn.Module) -> tuple[Point, ...]:
    """The keyed points of ``model``: its class's ``inner_points()`` where it declares them, else
    :func:`dense_points` (torchvision, timm and the other registry families)."""
    inner, _ = _unwrap(model)
    declare = getattr(inner, "inner_points", None)
    return tuple(declare()) if callable(declare) else dense_points(inner)


def inner_points(model: nn.Module, inner: InnerKey) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{point name: (perm, sign)}`` that ``inner`` gives each keyed point of ``model`` (sign: +1 or -1)."""
    out = {}
    for p in model_points(model):
        perm, flips = inner.point(p.name, p.channels, p.signs)
        out[p.name] = (torch.tensor(perm), 1.0 - 2.0 * torch.tensor(flips, dtype=torch.float32))
    return out


def keyed_points(model: nn.Module) -> dict[str, ChannelKey]:
    """The explicit keyed-point modules of ``model`` by qualified name (unwraps DDP)."""
    model = getattr(model, "module", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, ChannelKey)}


# --------------------------------------------------------------------------------------------
# Fold and unfold
# --------------------------------------------------------------------------------------------


def fold_tensor(t: Tensor, perm: Tensor, sign: Tensor, *, unfold: bool = False, signed: bool = True) -> Tensor:
    """A consumer's weight (or a same-shaped optimizer state) relabelled along dim 1.

    Fold (plain -> stored): ``out[:, j] = s_j * t[:, p_j]``; ``unfold=True`` inverts it. ``signed=False``
    for second moments (Adam's ``exp_avg_sq``), which a sign flip leaves unchanged. Exact in any dtype.
    """
    perm = perm.to(t.device)
    shape = [1] * t.dim()
    shape[1] = -1
    s = sign.to(t.device, t.dtype).view(shape) if signed else None
    if unfold:
        src = t * s if s is not None else t
        return src.index_select(1, torch.argsort(perm))
    out = t.index_select(1, perm)
    return out * s if s is not None else out


def _consumer_maps(model: nn.Module, inner: InnerKey | None) -> dict[str, tuple[Tensor, Tensor]]:
    """``{consumer weight name (unwrapped): (perm, sign)}`` for ``inner`` (empty for None)."""
    if inner is None:
        return {}
    points = {p.name: p for p in model_points(model)}
    return {f"{points[n].consumer}.weight": ps for n, ps in inner_points(model, inner).items()}


def current_inner_key(model: nn.Module) -> InnerKey | None:
    """The inner key ``model``'s weights are unfolded with (None: the stored, folded form)."""
    return getattr(_unwrap(model)[0], _ATTR, None)


def _as_inner(key: KeySet | InnerKey | None) -> InnerKey | None:
    from .keys import InnerKey

    return key if isinstance(key, InnerKey) or key is None else key.inner


def _check_points(model: nn.Module, inner: InnerKey | None) -> None:
    if inner is not None and not model_points(model):
        raise BlockkeyError(
            "the key has an inner part but the model has no keyed points (no dense layer after the first)"
        )


def use_inner_key(model: nn.Module, key: KeySet | InnerKey | None) -> nn.Module:
    """Relabel ``model``'s weights in place so that it computes as with ``key``'s inner part (identity for
    ``None`` or a key without one: the stored, folded form). Returns ``model``.

    The weights first go back to their stored form (from whatever key they were unfolded with), then are
    unfolded with the new key: switching keys is exact and costs one pass over the consumers' weights.
    Raises :class:`BlockkeyError` when the key has an inner part and the model has no keyed point.
    """
    inner = _as_inner(key)
    holder, _ = _unwrap(model)
    current = getattr(holder, _ATTR, None)
    _check_points(holder, inner)
    if inner == current:
        return model
    params = dict(holder.named_parameters())
    old, new = _consumer_maps(holder, current), _consumer_maps(holder, inner)
    with torch.no_grad():
        for name in old.keys() | new.keys():
            w = params[name].data
            if name in old:
                w = fold_tensor(w, *old[name])
            if name in new:
                w = fold_tensor(w, *new[name], unfold=True)
            params[name].data.copy_(w)
    object.__setattr__(holder, _ATTR, inner)
    return model


def refold_inner(model: nn.Module, old: KeySet | InnerKey | None, new: KeySet | InnerKey | None) -> nn.Module:
    """Move a model in its stored form from ``old``'s inner part to ``new``'s, in place (``old=None``: a plain
    model is given an inner key; ``new=None``: the key is taken out). The result is in its stored form."""
    use_inner_key(model, old)
    inner = _as_inner(new)
    _check_points(model, inner)
    object.__setattr__(_unwrap(model)[0], _ATTR, inner)  # the weights are plain: call them unfolded with ``new``
    return use_inner_key(model, None)


def _stored_maps(model: nn.Module) -> tuple[dict[str, tuple[Tensor, Tensor]], str]:
    holder, prefix = _unwrap(model)
    return _consumer_maps(holder, getattr(holder, _ATTR, None)), prefix


def stored_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every consumer weight in its folded (stored) form: what every file holds.

    The model is not changed. Without an inner key it is the state dict itself.
    """
    maps, prefix = _stored_maps(model)
    state = model.state_dict()
    for name, (perm, sign) in maps.items():
        state[prefix + name] = fold_tensor(state[prefix + name], perm, sign)
    return state


def load_stored_state_dict(model: nn.Module, state: Mapping[str, Tensor], key: KeySet | InnerKey | None) -> None:
    """Load a stored (folded) state dict into ``model``, then unfold it with ``key``'s inner part."""
    holder, _ = _unwrap(model)
    model.load_state_dict(state)
    object.__setattr__(holder, _ATTR, None)
    use_inner_key(model, key)


def fold_optimizer_tensors(
    model: nn.Module, opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor], *, unfold: bool = False
) -> dict[str, Tensor]:
    """Optimizer state tensors named ``"{param index}.{state name}"`` folded (or unfolded) like the weights
    they belong to: a momentum buffer of a plain weight is as revealing as the weight."""
    maps, _ = _stored_maps(model)
    if not maps:
        return dict(tensors)
    holder, _ = _unwrap(model)
    names = {id(p): n for n, p in holder.named_parameters()}
    order = [names.get(id(p)) for group in opt.param_groups for p in group["params"]]
    out = {}
    for k, v in tensors.items():
        i, what = k.split(".", 1)
        pname = order[int(i)]
        if pname in maps and v.dim() >= 2:
            v = fold_tensor(v, *maps[pname], unfold=unfold, signed=not what.endswith("_sq"))
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# The explicit view: a ChannelKey in front of each consumer
# --------------------------------------------------------------------------------------------


def _modules_at(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), child


def _apply_point(layer: nn.Module, args: tuple) -> tuple:
    point: nn.Module = layer.inner_point  # type: ignore[assignment]  # set by with_keyed_points
    return (point(args[0]), *args[1:])


def with_keyed_points(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in its stored form with an explicit :class:`ChannelKey` applied to the input of each
    keyed point's consumer (a forward pre-hook; the point is the consumer's ``inner_point`` submodule and holds
    no state, so the state dict is unchanged). Set the points with :func:`set_points` and it computes what
    :func:`use_inner_key` computes, by a gather in the forward pass: the attacks' view of a stolen model and
    the reference the fold reproduces. A consumer that its parent does not call as a module (the output
    projection of ``nn.MultiheadAttention``) is not keyed in the view."""
    out = copy.deepcopy(_unwrap(model)[0])
    use_inner_key(out, None)
    for name, m in list(out.named_modules()):  # modules of version 0.1 models: the weights hold the key now
        if isinstance(m, ChannelKey):
            parent, child = _modules_at(out, name)
            setattr(parent, child, nn.Identity())
    for p in model_points(out):
        layer = out.get_submodule(p.consumer)
        layer.inner_point = ChannelKey(p.channels, p.signs, -1 if isinstance(layer, nn.Linear) else 1)
        layer.register_forward_pre_hook(_apply_point)
    return out


def view_points(view: nn.Module) -> Iterator[tuple[Point, ChannelKey]]:
    """Each point of a :func:`with_keyed_points` view with its module (none for a model that is not a view)."""
    for p in model_points(view):
        point = getattr(view.get_submodule(p.consumer), "inner_point", None)
        if isinstance(point, ChannelKey):
            yield p, point


def set_points(view: nn.Module, key: KeySet | InnerKey | None) -> nn.Module:
    """Set every point of a :func:`with_keyed_points` view from ``key``'s inner part (None: identity)."""
    inner = _as_inner(key)
    keyed = inner_points(view, inner) if inner is not None else {}
    for p, point in view_points(view):
        point.set(*keyed.get(p.name, (None, None)))
    return view
