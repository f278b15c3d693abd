"""The Hugging Face bridge: any attnkit mechanism inside a Transformers model.

::

    import attnkit.hf
    model = AutoModelForCausalLM.from_config(LlamaConfig(...))   # or from_pretrained(local_dir)
    attnkit.hf.apply(model, "sliding_window", window=256)        # every layer; layers=[...] for a hybrid
    model.generate(ids, max_new_tokens=20)
    model.save_pretrained("out")
    model = attnkit.hf.load("out")                               # bit-exact, mechanism state included

How it hooks in. Transformers 5 routes every attention layer through two registries keyed by
``config._attn_implementation``: ``AttentionMaskInterface`` builds the mask once per forward,
``AttentionInterface`` computes each layer's attention from projected, rotated, cached
``q, k, v``. The bridge registers one function in each under ``attnkit_<mechanism>``:

- The mask function (:func:`~attnkit.hf.masks.bridge_mask`) returns a
  :class:`~attnkit.hf.masks.MaskLayout` instead of a 4-D mask: causal or bidirectional, the
  causal sliding window of Mistral/Qwen2 layers, and the key padding ``(B, S)``. Transformers'
  causal and bidirectional mask functions are recognised by identity; any other mask function is
  evaluated densely (``O(T·S)`` booleans in chunks, e.g. for sliding-window layers) and must equal
  one of those patterns exactly, or the forward is refused (packed sequences, chunked or block
  masks). The causal mask therefore cannot be lost: an attention layer that receives anything
  but a layout (or a ready 4-D mask the bridge reads back exactly) refuses to run.
- The attention function (:func:`~attnkit.hf.attention.bridge_attention`) expands grouped
  key/value heads and calls the layer's mechanism with ``causal=`` and ``attention_mask=`` (key
  padding; the queries of padded tokens are zeroed so nothing of theirs reaches real tokens).
  A sliding-window layer's window reaches the mechanism as its own window (``sliding_window`` with
  ``window <=`` the model's) or as a ``mask=`` (mechanisms with custom masks, e.g. ``full``); other
  mechanisms are refused unless no query of the call can see past its window. With a KV cache the
  queries are end-aligned with the cached keys, attnkit's causal convention: mechanisms with
  cross-attention are called directly, KV-cache mechanisms continue through their own ``decode``
  from the cached prefix. Mechanisms with neither make ``generate`` recompute the whole prefix
  (``generation_config.use_cache = False``, warned once) and refuse a cache forced on them.
- Decoding state (:mod:`attnkit.hf.cache`): ``generate`` builds an :class:`AttnkitCache` in which
  the layers of recurrent mechanisms (``linear``, ``performer``: O(1) per token in the context)
  and of ``sliding_window`` (its rolling O(window) key/value cache) keep the mechanism's own
  decoding state instead of every key and value; a manual loop passes
  :func:`new_cache` as its first cache. Beam search reorders the states; rolling them back
  (assisted decoding) is refused.

The mechanism of each layer is the submodule ``attnkit`` of the Transformers attention module, so
its parameters and buffers train, move with the model and are saved by ``save_pretrained``;
``config.attnkit`` records mechanism, options, layers and the implementation of the other
layers, and ``config.json`` names ``attn_implementation="attnkit_<mechanism>"``, so loading the
directory without attnkit fails instead of silently using Transformers' attention.
:func:`load` restores it bit for bit. After :func:`register`, ``attn_implementation=
"attnkit_<mechanism>"`` also works in ``from_config``/``from_pretrained`` for mechanisms without
parameters or buffers. Training with a mechanism that keeps online state (``routing``'s
centroids) needs ``attnkit.after_optimizer_step(model)`` after each optimizer step, as anywhere.

Refused, with a message that says why: families other than Llama, Qwen2, Mistral, GPT-2 and
BERT; a mechanism with no causal form in a decoder layer; attention weights
(``output_attentions``); attention dropout in training that the mechanism cannot apply (``full``
inherits the layer's dropout); a score scale the mechanism cannot use (``scale`` options inherit
the layer's); any option Transformers passes that the bridge does not know; static caches;
masks that are not causal, bidirectional or a causal sliding window.

Converting a pretrained model with distillation (``attnkit convert``) lives next to the bridge:
:mod:`attnkit.hf.convert` (the pipeline), :mod:`attnkit.hf.transfer` (the two resumable training
stages), :mod:`attnkit.hf.text` (local text, the tokenizer convention, perplexity),
:mod:`attnkit.hf.speed` (speed and memory against SDPA), :mod:`attnkit.hf.convert_report` and
:mod:`attnkit.hf.recipe` (the recipe's teacher and summary). They are imported on demand.
"""

from __future__ import annotations

_INSTALL_HINT = "pip install attnkit[hf]  (or: pip install 'transformers>=5,<6')"

try:
    import transformers as _transformers
except ImportError as _error:
    raise ImportError(f"attnkit.hf needs Hugging Face Transformers 5.x, which is not installed: {_INSTALL_HINT}") from (
        _error
    )

if _transformers.__version__.split(".")[0] != "5":
    raise ImportError(f"attnkit.hf needs Transformers 5.x, found {_transformers.__version__}: {_INSTALL_HINT}")

from attnkit.hf.bridge import BridgeSpec, apply, load, register  # noqa: E402
from attnkit.hf.cache import AttnkitCache, MechanismStateLayer, new_cache  # noqa: E402
from attnkit.hf.families import FAMILIES  # noqa: E402
from attnkit.hf.masks import MaskLayout  # noqa: E402

__all__ = [
    "FAMILIES",
    "AttnkitCache",
    "BridgeSpec",
    "MaskLayout",
    "MechanismStateLayer",
    "apply",
    "load",
    "new_cache",
    "register",
]
