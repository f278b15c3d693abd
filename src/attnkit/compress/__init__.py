"""Faster, smaller models: structured and magnitude pruning, int8 quantization, distillation.

Every function changes the model in place and returns ``(model, result)``: the result is a
small record (:mod:`attnkit.compress.records`) a report prints next to its measurements.

Example::

    from attnkit.compress import prune_heads, prune_ffn, quantize, distill, save_compressed, load_compressed

    model, pruned = prune_heads(model, 0.3, data=batches)        # gradient importance, Michel et al. 2019
    model, narrowed = prune_ffn(model, 0.25, score="magnitude")
    model, quantized = quantize(model, "int8_dynamic")           # route chosen for this machine
    print(pruned, narrowed, quantized, sep="\\n")
    save_compressed(model, "runs/lm-small")                      # config + weights + compression.json
    model = load_compressed("runs/lm-small")                     # exactly the same model

    student, result = distill(student, teacher, batches, steps=500, temperature=2.0)
    model, tuned = finetune(model, batches, steps=200, lr=1e-4)    # cross-entropy; pruned zeros stay zero

The command line (``attnkit compress``, ``attnkit distill``) adds a before/after report
(:mod:`attnkit.compress.report`); ``python -m attnkit.compress.summary`` measures many compressed
models against one baseline in one table with the floors judged (:mod:`attnkit.compress.summary`,
run by ``scripts/compress_report.sh``; the committed result is ``docs/compress-report/``).

The losses (:mod:`attnkit.compress.losses`) are plain tensor functions, shared with other
front ends. Quantization needs torchao (``pip install 'attnkit[compress]'``), imported only
when used.
"""

from attnkit.compress.distill import capture_features, distill
from attnkit.compress.ffn import feed_forward_layers, prune_ffn, remove_channels
from attnkit.compress.finetune import finetune, train_loop
from attnkit.compress.heads import attention_layers, head_importance, prune_heads, register_head_state, remove_heads
from attnkit.compress.losses import feature_loss, kd_loss, layer_map
from attnkit.compress.magnitude import prune_magnitude
from attnkit.compress.quantize import Int8Linear, choose_route, fbgemm_available, measure_routes, quantize
from attnkit.compress.records import (
    CompressionRecord,
    DistillResult,
    MagnitudeResult,
    PruneResult,
    QuantizeResult,
    record_of,
)
from attnkit.compress.saving import apply_record, load_compressed, save_compressed

__all__ = [
    "CompressionRecord",
    "DistillResult",
    "Int8Linear",
    "MagnitudeResult",
    "PruneResult",
    "QuantizeResult",
    "apply_record",
    "attention_layers",
    "capture_features",
    "choose_route",
    "distill",
    "fbgemm_available",
    "feature_loss",
    "feed_forward_layers",
    "finetune",
    "head_importance",
    "kd_loss",
    "layer_map",
    "load_compressed",
    "measure_routes",
    "prune_ffn",
    "prune_heads",
    "prune_magnitude",
    "quantize",
    "record_of",
    "register_head_state",
    "remove_channels",
    "remove_heads",
    "save_compressed",
    "train_loop",
]
