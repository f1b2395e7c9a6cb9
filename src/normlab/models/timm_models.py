"""``--model timm:<name>``: any timm architecture, built without downloading anything, with normlab's norm.

* The model is ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)`` (plus ``img_size``
  and ``drop_rate=--dropout`` where the architecture takes them). ``--pretrained PATH`` loads a local state_dict
  of the same architecture (``torch.load(weights_only=True)``); normlab never fetches timm's hub weights.
* The norm goes in through timm's own ``norm_layer=`` where the model takes one and builds plain norms with it
  (ConvNeXt with ``conv_mlp=True``, which timm requires for a custom norm: every norm then sees N x C x H x W).
  Models whose norms are timm's norm+activation layers (RegNet, EfficientNet, ...) are built as timm defines
  them and swapped with :func:`replace_norms`, which keeps each layer's own activation: timm does not tell a
  ``norm_layer`` function which activation a block wants. Models without ``norm_layer`` are swapped the same way.
* A two-image training-mode forward pass at the run's input size checks the result before any data is touched:
  a model that cannot run with the chosen norm or input size fails with one line, not in the first epoch; so
  does a model that would ignore its input: instance norm on 1x1 maps (RegNet's last stage at 32x32, ConvNeXt's
  head norm on pooled features at any size), or any norm after which two images give the same features.
* :func:`~normlab.models.swap.norm_swaps` compares the norm layers timm builds by default with the ones in the model, position by
  position: ``{"LayerNorm2d -> GroupNorm2d": 17}``, plus the norms left as they were. ``build_timm`` attaches
  the result to the model as ``normlab_swaps`` for the run's summary.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab.errors import NormlabError
from normlab.models.swap import is_normalization, norm_paths, norm_swaps, replace_norms
from normlab.norms import NormAct2d
from normlab.registry import TIMM_PREFIX

# keyword -> why it is passed; each is dropped again when the architecture does not take it
OPTIONAL_KWARGS = ("img_size", "drop_rate", "conv_mlp")
# Settings some architectures need to take a custom N x C x H x W norm through norm_layer (each dropped where
# the architecture has no such setting). ConvNeXt: conv_mlp, so that no norm runs on channels-last tensors
# (timm asserts it); its head norm still normalizes the pooled 1x1 features, as in timm's ConvNeXt.
NORM_LAYER_KWARGS = {"conv_mlp": True}
DEGENERATE = 1e-5  # relative feature difference between two random images below which a model ignores its input
PER_SAMPLE_CHANNEL = ("in",)  # statistics per sample and channel only: degenerate on 1x1 maps (bin mixes in BN)


def timm_name(model: str) -> str:
    return model[len(TIMM_PREFIX):] if model.startswith(TIMM_PREFIX) else model


def _timm():
    try:
        import timm
    except ImportError:
        raise NormlabError("--model timm:<name> needs timm: pip install 'normlab[timm]' (or pip install timm)") from None
    return timm


def check_name(name: str) -> None:
    """A one-line error for an architecture timm does not have, with the closest names."""
    timm = _timm()
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
        word = re.match(r"[A-Za-z]+", name or "")
        family = word.group(0).lower() if word else "resnet"
        raise NormlabError(f"model 'timm:{name}' is not a timm architecture: {hint}"
                           f"list them with python -c \"import timm; print(timm.list_models('*{family}*'))\"")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"


def _create(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` with ``kwargs``, dropping the optional ones the architecture refuses; returns the
    model and the keywords it was built with. Anything else timm raises becomes one line."""
    timm = _timm()
    kwargs = dict(kwargs)
    while True:
        try:
            return timm.create_model(name, pretrained=False, **kwargs), kwargs
        except TypeError as exc:
            refused = next((k for k in kwargs if k in OPTIONAL_KWARGS + ("norm_layer",) and f"'{k}'" in str(exc)), None)
            if refused is None:
                raise NormlabError(f"timm could not build {name} ({_first_line(exc)})") from None
            kwargs.pop(refused)
        except NormlabError:
            raise
        except Exception as exc:  # timm's asserts and value errors on odd settings
            raise NormlabError(f"timm could not build {name} with {sorted(kwargs)} ({_first_line(exc)})") from None


def _is_norm_act(m: nn.Module) -> bool:
    """timm's norm+activation layers (``BatchNormAct2d``, ``GroupNormAct``, ...): a norm that also applies ``act``."""
    return is_normalization(m) and isinstance(getattr(m, "act", None), nn.Module) and not isinstance(m, NormAct2d)


# ------------------------------------------------------------------------------------------ weights

def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise NormlabError(f"pretrained weights {file} not found: pass a state_dict file of this timm architecture")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NormlabError(f"pretrained weights {file} cannot be read ({_first_line(exc)}); save them with "
                           "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NormlabError(f"pretrained weights {file} are not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


@torch.no_grad()
def load_weights_file(model: nn.Module, path: str, name: str, norm_prefixes: list[str]) -> dict[str, Any]:
    """Load a local state_dict into ``model`` by name and shape. The classifier is skipped when its shape
    differs (another class count); a norm's tensors stay as initialised when the file has none that fit (another
    norm); any other missing or misfitting tensor is a one-line error (the file is not this architecture)."""
    state = _read_state_dict(path)
    classifier = ""
    if hasattr(model, "pretrained_cfg"):
        classifier = str(model.pretrained_cfg.get("classifier") or "")
    own = model.state_dict()

    def under(key: str, prefixes: list[str]) -> bool:
        return any(p and (key == p or key.startswith(p + ".")) for p in prefixes)

    load, skipped, left = {}, [], []
    for key, value in own.items():
        theirs = state.get(key)
        if theirs is not None and theirs.shape == value.shape:
            load[key] = theirs
        elif under(key, [classifier]):
            skipped.append(key)
        elif under(key, norm_prefixes):
            left.append(key)
        else:
            why = "missing" if theirs is None else f"shape {tuple(theirs.shape)}, the model {tuple(value.shape)}"
            raise NormlabError(f"pretrained weights {path} do not fit timm:{name}: {key} is {why}; pass a "
                               f"state_dict of {name} (with in_chans={_in_chans(model)})")
    model.load_state_dict(load, strict=False)
    return {"source": str(path), "loaded": len(load), "skipped": skipped, "norm_tensors_left": len(left)}


def _in_chans(model: nn.Module) -> Any:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else "?"


# ------------------------------------------------------------------------------------------ the model

@torch.no_grad()
def _probe(model: nn.Module, in_channels: int, size: int, what: str, watch: list[nn.Module] = ()
           ) -> tuple[int, float]:
    """One training-mode forward pass of two random images, leaving no trace (buffers and RNG restored).
    Returns how many of the ``watch`` layers saw 1x1 maps, and how much the two images' features (the
    classifier's input; the output where there is no classifier to find) differ relative to their size."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flat: set[int] = set()
    feats: list[torch.Tensor] = []

    def seen(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4 and args[0].shape[-2:].numel() == 1:
            flat.add(id(module))

    hooks = [m.register_forward_pre_hook(seen) for m in watch]
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):  # a zero-initialised head hides nothing
        hooks.append(head.register_forward_pre_hook(lambda _m, args: feats.append(args[0])))
    with torch.random.fork_rng(devices=[]):
        try:
            model.train()
            out = model(torch.randn(2, in_channels, size, size))
        except NormlabError as exc:
            if flat:  # a watched norm refused its 1x1 maps (normlab's per-sample norms do): the caller explains
                return len(flat), math.nan
            raise NormlabError(f"{what} cannot run on {in_channels}x{size}x{size} inputs: {exc}") from None
        except Exception as exc:
            raise NormlabError(f"{what} cannot run on {in_channels}x{size}x{size} inputs ({_first_line(exc)}); "
                               f"try --image-size {2 * size}, another --norm or another architecture") from None
        finally:
            for hook in hooks:
                hook.remove()
            for k, v in model.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])
    if out.ndim != 2:
        raise NormlabError(f"{what} gives outputs of shape {tuple(out.shape)}, not (batch, classes): it is not an "
                           "image classifier")
    f = (feats[-1] if feats else out).detach().float().flatten(1)
    spread = (f[0] - f[1]).abs().max().item() / max(f.abs().max().item(), 1e-30)
    return len(flat), spread


def build_timm(cfg, in_channels: int, num_classes: int, norm_kwargs: dict) -> nn.Module:
    """``--model timm:<name>`` with ``--norm``; the model carries ``normlab_swaps`` (see the module docstring)."""
    from normlab.norms import norm_layer

    name = timm_name(cfg.model)
    check_name(name)
    size = cfg.input_size
    factory = norm_layer(cfg.norm, **norm_kwargs)
    made = (type(factory(16)),)
    base = {"num_classes": num_classes, "in_chans": in_channels, "img_size": size}
    if getattr(cfg, "dropout", 0.0) and getattr(cfg, "head", "linear") == "linear":  # else the head's own
        base["drop_rate"] = cfg.dropout
    with torch.device("meta"):  # the stock layout, without allocating or initialising anything
        stock, used_kwargs = _create(name, {**base, **NORM_LAYER_KWARGS})
    stock_norms = norm_paths(stock)
    via = "replace_norms"
    model = None
    if stock_norms and not any(_is_norm_act(m) for m in stock_norms.values()):
        model, used = _create(name, {**base, **NORM_LAYER_KWARGS, "norm_layer": factory})
        if "norm_layer" in used:
            via, used_kwargs = "norm_layer", used
        else:
            model = None
    if model is None:
        model, used_kwargs = _create(name, {**base, **NORM_LAYER_KWARGS})
        stock_norms = norm_paths(model)  # the real layers: a swap replaces these very objects
    weights = None
    if getattr(cfg, "pretrained", None) and via == "replace_norms":  # the weights are the stock model's
        weights = load_weights_file(model, cfg.pretrained, name, list(stock_norms))
    if via == "replace_norms":
        model = replace_norms(model, factory)
    elif getattr(cfg, "pretrained", None):
        weights = load_weights_file(model, cfg.pretrained, name, list(stock_norms))
    swaps = norm_swaps(stock_norms, model, made)
    swaps["via"] = via
    if not swaps["swapped"]:
        have = ", ".join(f"{k} x{v}" for k, v in swaps["kept"].items()) or "none"
        raise NormlabError(f"timm:{name} has no norm layer normlab can swap for {cfg.norm!r} (its norms: {have}); "
                           "pick a convolutional architecture with BatchNorm/GroupNorm/LayerNorm2d layers")
    what = f"timm:{name} with norm {cfg.norm!r}"
    watch = [m for m in model.modules() if isinstance(m, made)] if cfg.norm in PER_SAMPLE_CHANNEL else []
    flat, spread = _probe(model, in_channels, size, what, watch)
    if flat:  # each channel of each image normalized over one value: the layer's output ignores its input
        bigger = next((s for s in (2 * size, 4 * size) if _probe(model, in_channels, s, what, watch)[0] == 0), None)
        fix = (f"use --image-size {bigger} or more, or" if bigger else
               "this holds at any input size (such a layer normalizes pooled features): use")
        # the norms refuse 1x1 maps themselves, so the probe stops at the first: "at least" that many
        raise NormlabError(f"{what}: {'at least ' if math.isnan(spread) else ''}{flat} of its norm layers see 1x1 maps "
                           f"at {size}x{size} inputs, where per-sample "
                           f"statistics are degenerate (the output no longer depends on the image); {fix} a norm with "
                           "batch or channel statistics (bn, bin, ln, gn)")
    if spread < DEGENERATE:
        raise NormlabError(f"{what} gives the same features for every image (relative difference {spread:.1e}): the "
                           "norm erases the input somewhere in this architecture (e.g. a per-sample norm right before "
                           "global pooling); pick another norm (bn, ln, gn)")
    swaps["timm_kwargs"] = {k: v for k, v in used_kwargs.items() if k in OPTIONAL_KWARGS}
    model.normlab_swaps = swaps  # type: ignore[assignment]
    if weights is not None:
        model.normlab_pretrained = weights  # type: ignore[assignment]
    return model


__all__ = ["build_timm", "check_name", "load_weights_file", "timm_name"]
