"""``apply``, ``load`` and ``register``: putting mechanisms into Transformers models and back out of disk."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AttentionInterface, AutoConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from attnkit.core.errors import warn_once
from attnkit.core.registry import attention_capabilities, get_spec, list_attention
from attnkit.hf.attention import (
    MECHANISM_ATTRIBUTE,
    PREFIX,
    attach,
    attached,
    bridge_attention,
    build_for_layer,
    layer_is_causal,
    mechanism_name,
)
from attnkit.hf.cache import install
from attnkit.hf.families import family_of, layer_index
from attnkit.hf.masks import bridge_mask

#: Version of the ``attnkit`` entry written into ``config.json``.
SPEC_FORMAT = 1
#: State-dict keys of mechanism parameters and buffers.
_MECHANISM_KEY = re.compile(rf"(^|\.){MECHANISM_ATTRIBUTE}\.")
_WARNED: set[str] = set()


@dataclass(frozen=True)
class BridgeSpec:
    """The attnkit choice a model carries in its config (``config.attnkit``).

    Attributes:
        mechanism: registered mechanism name.
        options: the options given to :func:`apply` (JSON values).
        layers: attention-layer indices that use the mechanism; None for all of them.
        base_attn_implementation: Transformers' implementation for the other layers.
    """

    mechanism: str
    options: dict[str, Any]
    layers: list[int] | None
    base_attn_implementation: str

    def to_config(self) -> dict[str, Any]:
        """The JSON-ready dict stored as ``config.attnkit``."""
        return {
            "format": SPEC_FORMAT,
            "mechanism": self.mechanism,
            "options": dict(self.options),
            "layers": None if self.layers is None else list(self.layers),
            "base_attn_implementation": self.base_attn_implementation,
        }

    @classmethod
    def from_config(cls, config: Any) -> BridgeSpec | None:
        """The spec stored in ``config`` (None when the model carries none).

        Raises:
            ValueError: the stored entry is malformed or from a newer format.
        """
        entry = getattr(config, "attnkit", None)
        if entry is None:
            return None
        if not isinstance(entry, dict) or entry.get("format") != SPEC_FORMAT:
            raise ValueError(
                f"config.attnkit must be a dict with format={SPEC_FORMAT}, got {entry!r}; "
                "it was written by another attnkit version"
            )
        try:
            return cls(
                mechanism=str(entry["mechanism"]),
                options=dict(entry["options"]),
                layers=None if entry["layers"] is None else [int(i) for i in entry["layers"]],
                base_attn_implementation=str(entry["base_attn_implementation"]),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"config.attnkit is missing or has a malformed field: {error}") from error


def register(names: Iterable[str] | None = None) -> list[str]:
    """Register ``attnkit_<mechanism>`` with Transformers' attention and mask interfaces.

    Afterwards ``from_config(config, attn_implementation="attnkit_sliding_window")`` (or
    ``from_pretrained``) builds models whose self-attention layers use the mechanism with its
    default options (or the options in ``config.attnkit``). That route works for mechanisms
    without parameters or buffers; the others need :func:`apply` or :func:`load`. Registering
    again is harmless; :func:`apply` and :func:`load` register for you.

    Args:
        names: mechanisms to register; default every registered mechanism.

    Returns:
        The implementation names registered.
    """
    chosen = list_attention() if names is None else [get_spec(n).name for n in names]
    registered = []
    for name in chosen:
        implementation = PREFIX + name
        AttentionInterface.register(implementation, bridge_attention)
        AttentionMaskInterface.register(implementation, bridge_mask)
        registered.append(implementation)
    return registered


def apply(
    model: PreTrainedModel, mechanism: str, *, layers: Iterable[int] | None = None, **options: Any
) -> PreTrainedModel:
    """Put an attnkit mechanism into the self-attention layers of a Transformers model, in place.

    Each chosen layer gets its own mechanism module as the submodule ``attnkit`` (so its
    parameters train, move with ``model.to`` and are saved by ``save_pretrained``); the model's
    ``attn_implementation`` becomes ``attnkit_<mechanism>``; ``config.attnkit`` records the choice.
    Layers not chosen keep the model's previous implementation. Applying again replaces the choice.

    Args:
        model: a Llama, Qwen2, Mistral, GPT-2 or BERT model (any head).
        mechanism: a registered mechanism name (:func:`attnkit.list_attention`).
        layers: indices of the attention layers to change (a hybrid); default all.
        **options: the mechanism's options (e.g. ``window=256``); JSON values, so they can be saved.

    Returns:
        ``model``.

    Raises:
        ValueError: an unsupported family, bad layer indices, options that cannot be saved, or a
            mechanism a layer cannot use exactly (e.g. no causal form in a decoder).
        TypeError: ``model`` is not a Transformers model, or an unknown option.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    family = family_of(model.config)
    name = get_spec(mechanism).name
    _check_json("options", options)
    modules = family.attention_modules(model)
    chosen = _choose_layers(layers, [layer_index(m) for m in modules])
    previous = BridgeSpec.from_config(model.config)
    base = previous.base_attn_implementation if previous else model.config._attn_implementation
    if mechanism_name(base) is not None:
        raise ValueError(f"the model uses attn_implementation={base!r} without an attnkit entry in its config")
    # Everything that can fail happens before the model changes: no half-applied model.
    built = {layer_index(m): build_for_layer(name, options, m, family) for m in modules if layer_index(m) in chosen}
    register([name])
    model.set_attn_implementation(PREFIX + name)
    for module in modules:
        attach(module, built.get(layer_index(module)))
    spec = BridgeSpec(name, dict(options), None if layers is None else sorted(chosen), base)
    model.config.attnkit = spec.to_config()
    # A saved config then names the implementation, so loading it without attnkit fails loudly
    # instead of silently running Transformers' own attention.
    model.config.attn_implementation = PREFIX + name
    _recompute_for_generation(model, name, modules)
    install(model)  # generate() keeps recurrent and rolling-window state in an AttnkitCache
    return model


def _check_json(what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON values so the model can be saved, got {value!r} ({error})") from error


def _choose_layers(layers: Iterable[int] | None, available: list[int]) -> set[int]:
    if layers is None:
        return set(available)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"layers must be a list of attention-layer indices, got {layers!r}")
    chosen = list(layers)
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or i not in available]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"layers must be distinct indices among {available[0]}..{available[-1]} (the model's "
            f"{len(available)} attention layers), got {chosen!r}"
        )
    return set(chosen)


def _recompute_for_generation(model: PreTrainedModel, name: str, modules: list[nn.Module]) -> None:
    """Mechanisms that cannot continue from a key/value cache make ``generate`` recompute (warned once)."""
    caps = attention_capabilities(name)
    decoder = any(layer_is_causal(m) for m in modules if attached(m) is not None)
    config = getattr(model, "generation_config", None)
    if not decoder or caps.cross_attention or caps.decoding is not None or config is None:
        return
    config.use_cache = False
    warn_once(
        _WARNED,
        name,
        f"attention {name!r} has no incremental decoding state; generate() recomputes the whole prefix at "
        "every step (model.generation_config.use_cache is now False)",
        stacklevel=3,
    )


def load(path: str | Path, **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """Load a model saved after :func:`apply`: Transformers' weights, then the attnkit choice and state.

    The architecture class comes from ``config.architectures``; Transformers loads its own
    weights (mechanism tensors are left to the bridge, not reported as unexpected), the
    mechanism is applied again from ``config.attnkit``, and its parameters and buffers are
    read from the checkpoint's safetensors files, bit for bit.

    Args:
        path: a directory written by ``model.save_pretrained``.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``...);
            ``attn_implementation`` sets the implementation of the layers attnkit does not change.

    Returns:
        The model, in eval mode like any ``from_pretrained`` model.

    Raises:
        ValueError: the directory holds no attnkit entry, an unknown architecture, or mechanism
            tensors that do not match the mechanism (missing or extra keys).
    """
    register()
    directory = Path(path)
    config = AutoConfig.from_pretrained(directory)
    spec = BridgeSpec.from_config(config)
    if spec is None:
        raise ValueError(
            f"{directory}/config.json has no 'attnkit' entry: the model was not saved after attnkit.hf.apply; "
            "load it with transformers directly"
        )
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(f"{directory}/config.json names no Transformers model class (architectures={architectures})")
    base = from_pretrained_kwargs.pop("attn_implementation", spec.base_attn_implementation)
    if mechanism_name(base) is not None:
        raise ValueError(
            f"attn_implementation={base!r}: pass the implementation of the other layers, not an attnkit one"
        )
    # Transformers would report the mechanism tensors as unexpected keys; this subclass (used only
    # while loading) tells it they are expected elsewhere.
    ignored = [*(cls._keys_to_ignore_on_load_unexpected or []), _MECHANISM_KEY.pattern]
    loader: Any = type(
        cls.__name__, (cls,), {"_keys_to_ignore_on_load_unexpected": ignored, "__module__": cls.__module__}
    )
    model = loader.from_pretrained(directory, attn_implementation=base, **from_pretrained_kwargs)
    model.__class__ = cls
    model.config.attnkit = None  # apply records the spec afresh (same values), on top of the base
    apply(model, spec.mechanism, layers=spec.layers, **spec.options)
    _load_mechanism_state(model, directory)
    return model


def _load_mechanism_state(model: nn.Module, directory: Path) -> None:
    expected = {k for k in model.state_dict() if _MECHANISM_KEY.search(k)}
    stored: dict[str, Tensor] = {}
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if _MECHANISM_KEY.search(key):
                    stored[key] = handle.get_tensor(key)
    missing, extra = sorted(expected - set(stored)), sorted(set(stored) - expected)
    if missing or extra:
        raise ValueError(
            f"the mechanism tensors in {directory} do not match the mechanism: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}"
        )
    result = model.load_state_dict(stored, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    raise ValueError(f"{directory} holds no model.safetensors (save with model.save_pretrained(directory))")
