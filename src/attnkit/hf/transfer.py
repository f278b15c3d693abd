"""The two distillation stages of ``attnkit convert``, and the resumable state between them.

Stage 1, attention transfer (Hedgehog, Zhang et al. 2024, arXiv:2402.04347; LoLCATs, Zhang et
al. 2024, arXiv:2410.10254): every converted layer's attention module gets the *teacher's* input
to that layer (a forward pre-hook swaps it in) and its output (after the output projection) is
pulled towards the teacher layer's output on the same tokens with
:func:`attnkit.compress.losses.feature_loss`. Because each layer sees the teacher's input, the
layers learn independently, as in LoLCATs.

Stage 2, a short end-to-end fine-tune: :func:`attnkit.compress.losses.kd_loss` between the
student's and the teacher's next-token distributions, plus ``ce_weight`` times the
cross-entropy on the text.

What trains (``train``; both stages; everything else stays bit-identical to the teacher):

- ``"qk"`` (default): the converted layers' query and key projections (GPT-2: its fused
  ``c_attn``, which also holds the values) plus the mechanism's own parameters. Softmax
  attention's behaviour is decided by where queries and keys point; a kernel (``linear``,
  ``performer``) or a window (``sliding_window``) approximates it best when q/k are re-aimed for it.
- ``"qkvo"``: also the value and output projections.

(No causal mechanism has parameters of its own today, so the projections are what trains; a
mechanism with parameters gets them trained too, with either choice.)

The student trains in eval mode (dropout off). Resumable state (``resume.pt`` in the work
directory, written atomically every ``save_every`` steps and when a stage ends): the student's
state dict, the optimizer, stage, step, the history, torch's RNG state and a fingerprint of the
settings; it is read with ``torch.load(weights_only=True)``. Batches depend only on ``(seed, stage, step)``
(:func:`attnkit.hf.text.batch_at`), so a resumed run continues exactly where the saved one was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.compress.losses import feature_loss, kd_loss
from attnkit.hf.attention import attached
from attnkit.hf.families import family_of, layer_index
from attnkit.hf.text import batch_at

TRAIN_CHOICES = ("qk", "qkvo")
#: Per family kind: the projection attributes of an attention module each ``train`` choice adds.
_PROJECTIONS = {
    "llama_style": {"qk": ("q_proj", "k_proj"), "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "gpt2": {"qk": ("c_attn",), "qkvo": ("c_attn", "c_proj")},
}
RESUME_FILE = "resume.pt"
#: ``on_step(stage, step, values)`` after every optimizer step (logging; tests interrupt through it).
StepCallback = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class TransferSettings:
    """How the student is trained.

    Attributes:
        layer_steps: stage-1 optimizer steps (attention transfer); 0 skips the stage.
        steps: stage-2 optimizer steps (logit distillation); 0 skips the stage.
        train: what trains, one of :data:`TRAIN_CHOICES` (module docstring).
        layer_lr: stage-1 peak learning rate.
        lr: stage-2 peak learning rate.
        warmup_steps: linear warm-up of each stage (then cosine to 10%).
        batch_size: windows per step.
        seq_len: tokens per window.
        temperature: ``kd_loss`` temperature.
        ce_weight: weight of the cross-entropy on the text added to the stage-2 loss.
        grad_clip: gradient-norm clipping (0: off).
        save_every: write the resumable state every this many steps.
        seed: batches and the mechanism's initialisation.
    """

    layer_steps: int = 200
    steps: int = 200
    train: str = "qk"
    layer_lr: float = 1e-3
    lr: float = 3e-4
    warmup_steps: int = 10
    batch_size: int = 4
    seq_len: int = 512
    temperature: float = 1.0
    ce_weight: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        from attnkit.core.errors import (
            check_non_negative_float,
            check_non_negative_int,
            check_positive_float,
            check_positive_int,
        )

        for name in ("layer_steps", "steps", "warmup_steps", "seed"):
            check_non_negative_int(name, getattr(self, name))
        for name in ("batch_size", "seq_len", "save_every"):
            check_positive_int(name, getattr(self, name))
        for name in ("layer_lr", "lr", "temperature"):
            check_positive_float(name, getattr(self, name))
        for name in ("ce_weight", "grad_clip"):
            check_non_negative_float(name, getattr(self, name))
        if self.train not in TRAIN_CHOICES:
            raise ValueError(f"train must be one of {', '.join(TRAIN_CHOICES)}, got {self.train!r}")


def converted_modules(model: nn.Module) -> dict[int, nn.Module]:
    """``{layer index: attention module}`` of the layers that carry an attnkit mechanism."""
    family = family_of(model.config)
    return {layer_index(m): m for m in family.attention_modules(model) if attached(m) is not None}


def trainable_parameters(student: nn.Module, train: str) -> dict[str, nn.Parameter]:
    """The parameters ``train`` selects (module docstring), by their name in ``student``.

    Raises:
        ValueError: an unknown choice, or no converted layer.
    """
    if train not in TRAIN_CHOICES:
        raise ValueError(f"train must be one of {', '.join(TRAIN_CHOICES)}, got {train!r}")
    family = family_of(student.config)
    kind = "gpt2" if family.model_type == "gpt2" else "llama_style"
    chosen: list[nn.Module] = []
    for module in converted_modules(student).values():
        chosen.append(attached(module))  # type: ignore[arg-type]
        chosen += [getattr(module, name) for name in _PROJECTIONS[kind][train]]
    wanted = {id(p) for m in chosen for p in m.parameters()}
    selected = {name: p for name, p in student.named_parameters() if id(p) in wanted}
    if not selected:
        raise ValueError("the student has no converted attention layer to train (apply a mechanism first)")
    return selected


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    # Llama-style layers pass hidden_states by keyword, GPT-2 positionally.
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextlib.contextmanager
def capture_attention(
    model: nn.Module, layers: list[int], *, inputs: dict[int, Tensor] | None = None
) -> Iterator[tuple[dict[int, Tensor], dict[int, Tensor]]]:
    """Record the input and output of the attention modules of ``layers`` during forwards in the block.

    Args:
        model: a Transformers model of a supported family.
        layers: attention-layer indices to record.
        inputs: if given, each recorded module's input hidden states are *replaced* by
            ``inputs[layer]`` (teacher forcing of stage 1).

    Yields:
        ``(inputs seen, outputs)``: ``{layer: (B, T, hidden)}`` dicts filled by the forward.
    """
    family = family_of(model.config)
    seen: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}
    handles = []
    for module in family.attention_modules(model):
        index = layer_index(module)
        if index not in layers:
            continue

        def before(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int = index) -> Any:
            seen[index] = _hidden_states(args, kwargs)
            if inputs is None:
                return None
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": inputs[index]}
            return (inputs[index], *args[1:]), kwargs

        def after(mod: nn.Module, args: tuple[Any, ...], output: Any, index: int = index) -> None:
            outputs[index] = output[0] if isinstance(output, tuple) else output

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after))
    try:
        yield seen, outputs
    finally:
        for handle in handles:
            handle.remove()


def layer_transfer_loss(teacher: nn.Module, student: nn.Module, input_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage-1 loss: ``feature_loss`` of each converted layer's attention output vs the teacher's.

    Each converted student layer's attention receives the teacher's input to that layer.

    Args:
        teacher: the original model.
        student: the converted model (same family and shapes).
        input_ids: ``(B, T)``.

    Returns:
        ``(loss, {"layer<i>": that layer's mean squared error})``.
    """
    layers = sorted(converted_modules(student))
    with torch.no_grad(), capture_attention(teacher, layers) as (teacher_in, teacher_out):
        teacher(input_ids=input_ids, use_cache=False)
    with capture_attention(student, layers, inputs=teacher_in) as (_, student_out):
        student(input_ids=input_ids, use_cache=False)
    parts = {f"layer{i}": feature_loss([student_out[i]], [teacher_out[i]]).detach() for i in layers}
    loss = feature_loss([student_out[i] for i in layers], [teacher_out[i] for i in layers])
    return loss, parts


def logit_distillation_loss(
    teacher: nn.Module, student: nn.Module, window: Tensor, *, temperature: float, ce_weight: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage-2 loss: ``kd_loss`` on next-token logits plus ``ce_weight`` times the cross-entropy.

    Args:
        window: ``(B, T + 1)`` tokens; the first ``T`` are the input, the last ``T`` the targets.
    """
    inputs, targets = window[:, :-1], window[:, 1:]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs, use_cache=False).logits
    logits = student(input_ids=inputs, use_cache=False).logits
    kd = kd_loss(logits, teacher_logits, temperature=temperature)
    ce = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return kd + ce_weight * ce, {"kd": kd.detach(), "ce": ce.detach()}


def fingerprint(settings: TransferSettings, identity: dict[str, Any]) -> str:
    """A digest of everything that decides the trained weights (``save_every`` excepted)."""
    values = {k: v for k, v in asdict(settings).items() if k != "save_every"}
    text = json.dumps({"settings": values, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then an atomic rename: a kill leaves the old state or the new."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_state(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The saved state, or None when there is none.

    Raises:
        ValueError: a state saved with other settings (another teacher, mechanism or option).
    """
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != expected_fingerprint:
        raise ValueError(
            f"{path} holds an interrupted conversion with different settings (teacher, attention, options or "
            f"training settings); rerun the same command to resume it, or delete {path.parent} to start afresh"
        )
    return state


def distill(
    teacher: nn.Module,
    student: nn.Module,
    tokens: Tensor,
    settings: TransferSettings,
    *,
    state_path: Path | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> list[dict[str, float]]:
    """Train ``student`` (in place) through stage 1 then stage 2, resuming from ``state_path`` if it holds a state.

    Args:
        teacher: the original model (frozen, eval mode).
        student: the converted model; only :func:`trainable_parameters` change.
        tokens: the training text's token ids ``(N,)``.
        settings: steps, rates, what trains.
        state_path: where the resumable state lives (None: no saving, no resuming).
        identity: JSON values naming the teacher, mechanism and options (part of the fingerprint).
        progress: show progress bars.
        on_step: called after every optimizer step.

    Returns:
        The history: one entry per ``save_every`` steps and at each stage's end.
    """
    from tqdm import tqdm

    from attnkit.train.schedule import learning_rate

    device = next(student.parameters()).device
    teacher.eval()
    params = trainable_parameters(student, settings.train)
    # Gradients flow only into the trained parameters; every flag is restored at the end.
    flags = {id(p): p.requires_grad for p in (*teacher.parameters(), *student.parameters())}
    teacher.requires_grad_(False)
    student.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    digest = fingerprint(settings, identity or {})
    state = load_state(state_path, digest) if state_path is not None else None
    stage, done, history = 1, 0, []
    if state is not None:
        student.load_state_dict(state["student"])
        stage, done, history = int(state["stage"]), int(state["step"]), list(state["history"])
        torch.set_rng_state(state["rng"])
    for current, total, lr in ((1, settings.layer_steps, settings.layer_lr), (2, settings.steps, settings.lr)):
        if current < stage or total == 0:
            continue
        start = done if current == stage else 0
        optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
        if state is not None and current == stage and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        label = "stage 1: attention transfer" if current == 1 else "stage 2: logit distillation"
        bar = tqdm(total=total, initial=start, disable=not progress, desc=label, unit="step", dynamic_ncols=True)
        # The student trains in eval mode: no dropout. The targets are the deterministic teacher's,
        # and a mechanism cannot apply a layer's attention dropout (GPT-2's attn_pdrop) anyway.
        student.eval()
        try:
            for step in range(start + 1, total + 1):
                window = batch_at(
                    tokens,
                    seed=settings.seed,
                    stage=current,
                    step=step,
                    batch_size=settings.batch_size,
                    seq_len=settings.seq_len,
                ).to(device)
                if current == 1:
                    loss, parts = layer_transfer_loss(teacher, student, window[:, :-1])
                else:
                    loss, parts = logit_distillation_loss(
                        teacher, student, window, temperature=settings.temperature, ce_weight=settings.ce_weight
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                rate = learning_rate(step, lr=lr, warmup_steps=settings.warmup_steps, max_steps=total)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), settings.grad_clip)
                optimizer.step()
                values = {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}
                bar.set_postfix(loss=f"{values['loss']:.4g}")
                bar.update(1)
                if step % settings.save_every == 0 or step == total:
                    history.append({"stage": float(current), "step": float(step), "lr": rate, **values})
                    if state_path is not None:
                        finished = step == total
                        save_state(
                            state_path,
                            {
                                "fingerprint": digest,
                                "stage": current + 1 if finished else current,
                                "step": 0 if finished else step,
                                "student": student.state_dict(),
                                "optimizer": None if finished else optimizer.state_dict(),
                                "history": history,
                                "rng": torch.get_rng_state(),
                            },
                        )
                if on_step is not None:
                    on_step(current, step, values)
        finally:
            bar.close()
            student.eval()
    for p in (*teacher.parameters(), *student.parameters()):
        p.requires_grad_(flags[id(p)])
    return history
