"""Train a student against a frozen teacher (knowledge distillation) on attnkit models.

The headline use: a full-attention teacher and a student with the same vocabulary and a cheaper
mechanism (``sliding_window``, ``linear``, ...), possibly fewer layers or heads, so efficient
attention is adopted without pretraining from scratch. Each step minimises

``alpha · kd_loss(student, teacher, T) + (1 - alpha) · CE(student, labels)
+ hidden_weight · feature_loss(hidden states) + attention_weight · feature_loss(attention outputs)``

(:mod:`attnkit.compress.losses`). Features are captured by hooks: a layer's *hidden state* is the
residual stream it hands on (the input of the next layer's attention branch, the final norm's
input for the last layer), its *attention output* is its self-attention branch's output; student
layer ``i`` is matched with teacher layer ``layer_map[i]``.

The loop is :func:`attnkit.compress.finetune.train_loop` (the trainer's schedule, parameter
groups and post-step hook on a given model with a given loss), shared with :func:`finetune`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from attnkit.compress.finetune import check_loop_settings, train_loop
from attnkit.compress.losses import feature_loss, kd_loss, label_loss, layer_map
from attnkit.compress.records import DistillResult
from attnkit.core.errors import check_non_negative_float, check_positive_float
from attnkit.data.tasks import Batch

#: Feature kinds :func:`capture_features` can record.
FEATURES: tuple[str, ...] = ("hidden", "attention")


@contextmanager
def capture_features(model: nn.Module, kinds: Sequence[str]) -> Iterator[dict[str, dict[str, dict[int, Tensor]]]]:
    """Record per-layer features of ``model``'s forward passes while the block runs.

    Args:
        model: an attnkit model (it must have ``named_stacks()``).
        kinds: some of ``"hidden"`` and ``"attention"``.

    Yields:
        ``{kind: {stack name: {layer index: (B, T, dim) tensor}}}``, filled by each forward
        (a recomputed forward, as with activation checkpointing, overwrites the same entries).
    """
    named_stacks = getattr(model, "named_stacks", None)
    if not callable(named_stacks):
        raise ValueError(f"feature matching needs an attnkit model (with named_stacks()), got {type(model).__name__}")
    features: dict[str, dict[str, dict[int, Tensor]]] = {kind: {} for kind in kinds}
    handles = []

    def store(kind: str, stack: str, index: int, value: Tensor) -> None:
        features[kind].setdefault(stack, {})[index] = value

    for stack_name, stack in named_stacks():
        layers = stack.layer_list()
        for i, layer in enumerate(layers):
            if "attention" in kinds:
                handles.append(
                    layer.self_attention.register_forward_hook(
                        lambda m, args, out, s=stack_name, i=i: store("attention", s, i, out)
                    )
                )
            if "hidden" in kinds:
                after = layers[i + 1].self_attention if i + 1 < len(layers) else stack.norm
                handles.append(
                    after.register_forward_pre_hook(lambda m, args, s=stack_name, i=i: store("hidden", s, i, args[0]))
                )
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


def _check_pair(student: nn.Module, teacher: nn.Module, features: bool) -> None:
    s_cfg, t_cfg = getattr(student, "config", None), getattr(teacher, "config", None)
    if s_cfg is None or t_cfg is None:
        return  # not attnkit models: kd_loss still checks the vocabularies on the logits
    if s_cfg.vocab_size != t_cfg.vocab_size:
        raise ValueError(
            f"teacher has a vocabulary of {t_cfg.vocab_size} ids but the student has {s_cfg.vocab_size}: "
            "distillation compares their output distributions token by token, so both must use the same "
            "tokenizer (build the student with vocab_size=teacher.config.vocab_size)"
        )
    if s_cfg.num_classes != t_cfg.num_classes:
        raise ValueError(f"teacher has num_classes={t_cfg.num_classes} but the student has {s_cfg.num_classes}")
    if type(student) is not type(teacher):
        raise ValueError(
            f"teacher is a {type(teacher).__name__} but the student is a {type(student).__name__}; "
            "distill between models of the same kind"
        )
    if features:
        if s_cfg.dim != t_cfg.dim:
            raise ValueError(
                f"hidden_weight/attention_weight match features, which needs the same width: student dim={s_cfg.dim}, "
                f"teacher dim={t_cfg.dim} (set both weights to 0 for logit distillation only)"
            )
        if s_cfg.reversible:
            raise ValueError(
                "feature matching needs the activations autograd sees; a reversible student recomputes them in "
                "backward (set hidden_weight=attention_weight=0, or distill a student with reversible=False)"
            )


def _matched(
    student: dict[str, dict[int, Tensor]], teacher: dict[str, dict[int, Tensor]], mapping: Sequence[int] | None
) -> tuple[list[Tensor], list[Tensor], list[str]]:
    s_out, t_out, stacks = [], [], []
    for stack, layers in student.items():
        t_layers = teacher.get(stack, {})
        n_s, n_t = len(layers), len(t_layers)
        targets = list(mapping) if mapping is not None else layer_map(n_s, n_t)
        if len(targets) != n_s or not all(isinstance(j, int) and 0 <= j < n_t for j in targets):
            raise ValueError(
                f"layer_map must give each of the student's {n_s} {stack} layers a teacher layer in 0..{n_t - 1}, "
                f"got {list(targets)}"
            )
        for i, j in enumerate(targets):
            s_out.append(layers[i])
            t_out.append(t_layers[j])
            stacks.append(stack)
    return s_out, t_out, stacks


def _feature_mask(batch: Batch, stack: str) -> Tensor:
    if stack == "decoder" and batch.decoder_attention_mask is not None:
        return batch.decoder_attention_mask
    return batch.attention_mask


def _feature_term(
    student: dict[str, dict[int, Tensor]],
    teacher: dict[str, dict[int, Tensor]],
    mapping: Sequence[int] | None,
    batch: Batch,
) -> Tensor:
    s_feats, t_feats, stacks = _matched(student, teacher, mapping)
    terms = [feature_loss([s], [t], mask=_feature_mask(batch, stack)) for s, t, stack in zip(s_feats, t_feats, stacks)]
    return torch.stack(terms).mean()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Batch],
    *,
    steps: int,
    lr: float = 3e-4,
    temperature: float = 2.0,
    alpha: float = 0.9,
    hidden_weight: float = 0.0,
    attention_weight: float = 0.0,
    layer_map: Sequence[int] | None = None,
    warmup_steps: int = 0,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    log_every: int = 10,
    progress: bool = True,
) -> tuple[nn.Module, DistillResult]:
    """Train ``student`` to match a frozen ``teacher`` for ``steps`` optimizer steps.

    Args:
        student: the model to train (in place); an attnkit model for feature matching.
        teacher: the frozen teacher (put in eval mode; gets no gradients), same vocabulary.
        data: an iterable of :class:`~attnkit.data.tasks.Batch` (one batch per step), e.g. a
            :class:`~attnkit.data.batching.BucketBatcher` over ``build_data("text").stream("train")``.
        steps: optimizer steps.
        lr: peak learning rate (AdamW; linear warm-up, then cosine to 10%).
        temperature: ``T`` of the logit loss.
        alpha: weight of the logit loss; ``1 - alpha`` goes to cross-entropy on the labels.
        hidden_weight: weight of hidden-state matching (0: off).
        attention_weight: weight of attention-output matching (0: off).
        layer_map: teacher layer for each student layer (per stack); default evenly spread.
        warmup_steps: warm-up steps of the schedule.
        weight_decay: AdamW weight decay (matrices only, as the trainer does).
        grad_clip: gradient-norm clipping (0: off).
        log_every: keep a history entry every this many steps (and the last).
        progress: show a progress bar.

    Returns:
        ``(student, result)``, the student in eval mode.

    Raises:
        ValueError: different vocabularies (naming ``teacher``), bad settings, data that runs out.
    """
    from attnkit.train.modeling import forward

    check_loop_settings(steps=steps, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip)
    check_positive_float("temperature", temperature)
    for name, value in (("alpha", alpha), ("hidden_weight", hidden_weight), ("attention_weight", attention_weight)):
        check_non_negative_float(name, value)
    if alpha > 1:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the logit loss), got {alpha!r}")
    kinds = [k for k, w in (("hidden", hidden_weight), ("attention", attention_weight)) if w > 0]
    _check_pair(student, teacher, bool(kinds))
    device = next(student.parameters()).device
    if next(teacher.parameters()).device != device:
        raise ValueError(f"teacher is on {next(teacher.parameters()).device} but the student on {device}; move one")
    teacher.eval()

    def step_loss(batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad(), _capture(teacher, kinds) as t_feats:
            t_logits = forward(teacher, batch)
        with _capture(student, kinds) as s_feats:
            s_logits = forward(student, batch)
        parts = {"kd": kd_loss(s_logits, t_logits, temperature=temperature, labels=batch.labels)}
        loss = alpha * parts["kd"]
        if alpha < 1:
            parts["ce"] = label_loss(s_logits, batch.labels)
            loss = loss + (1 - alpha) * parts["ce"]
        for kind, weight in (("hidden", hidden_weight), ("attention", attention_weight)):
            if weight > 0:
                parts[kind] = _feature_term(s_feats[kind], t_feats[kind], layer_map, batch)
                loss = loss + weight * parts[kind]
        return loss, parts

    result = train_loop(
        student,
        data,
        step_loss,
        steps=steps,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        log_every=log_every,
        progress=progress,
        description="distill",
    )
    return student, result


@contextmanager
def _capture(model: nn.Module, kinds: Sequence[str]) -> Iterator[dict[str, dict[str, dict[int, Tensor]]]]:
    """:func:`capture_features`, or nothing at all when no feature is matched (any model then works)."""
    if not kinds:
        yield {}
        return
    with capture_features(model, kinds) as features:
        yield features
