"""Importance of prunable units (attention heads, feed-forward channels) and which ones to remove.

Gradient score (Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?", NeurIPS
2019, arXiv:1905.10650, section 4.1): put a gate ``ξ_u = 1`` on every unit's output and take
``I_u = E_x |∂L(x)/∂ξ_u|`` over examples ``x``. A unit's output enters the model only through
the input features of one linear layer (a head's ``head_dim`` columns of the attention output
projection, a channel's column of the feed-forward output projection), so the gate multiplies
those features. One gate per *example* gives every example's own gradient in one backward pass
(the absolute value is taken per example, as in the paper, not of the batch's sum).

Selection: scores are normalised per layer (divided by the layer's l2 norm, the paper's section
4.2) and the globally lowest are removed, never the last unit of a layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.core.errors import check_choice
from attnkit.data.tasks import IGNORE_INDEX, Batch

SCORES: tuple[str, ...] = ("gradient", "magnitude")


def ranking_score(amount: Any, score: str | None, data: Any, *, unit: str) -> str:
    """The score that ranks ``unit`` for ``amount``: ``"given"`` when ``amount`` names them itself.

    ``score`` and ``data`` only rank units for a fractional ``amount``; passed with an explicit
    ``{layer: [...]}`` they would change nothing, so they are refused rather than ignored.
    """
    if isinstance(amount, Mapping):
        if score is not None or data is not None:
            raise ValueError(
                f"score and data rank {unit} for a fractional amount, but amount={{layer: [...]}} names the "
                f"{unit} to remove itself: drop score= and data="
            )
        return "given"
    chosen = "gradient" if score is None else score
    check_choice("score", chosen, SCORES)
    return chosen


def check_amount_fraction(amount: Any) -> float:
    """``amount`` as a float in ``[0, 1)``, else a ``ValueError`` naming it."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise ValueError(
            f"amount must be a fraction in [0, 1) (0.3 removes 30%) or a dict {{layer: [indices]}}, got {amount!r}"
        )
    return float(amount)


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Each example's mean cross-entropy over its counted targets: ``(B,)`` (0 for rows without targets).

    Args:
        logits: ``(B, C)`` (classification) or ``(B, T, V)``.
        labels: ``(B,)`` or ``(B, T)``, ``IGNORE_INDEX`` where nothing counts.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 models stay float64
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
    token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX)  # (B, T)
    counted = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token.sum(dim=1) / counted


def _batches(data: Any, max_batches: int) -> list[Batch]:
    if data is None:
        raise ValueError(
            "score='gradient' needs data: an iterable of attnkit Batch objects to score on "
            "(e.g. attnkit.data.batching.eval_batches(...)); or pass score='magnitude'"
        )
    if isinstance(data, Batch):
        data = [data]
    if not isinstance(data, Iterable):
        raise ValueError(f"data must be an iterable of attnkit Batch objects, got {type(data).__name__}")
    batches = list(islice(iter(data), max_batches))
    if not batches:
        raise ValueError("data gave no batches to score on")
    bad = [type(b).__name__ for b in batches if not isinstance(b, Batch)]
    if bad:
        raise ValueError(f"data must yield attnkit Batch objects, got {bad[0]}")
    return batches


def _gate_hook(gates: dict[str, Tensor], name: str, units: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]  # (B, ..., units * width): the unit outputs, concatenated
        gate = gates[name]  # (B, units)
        shape = x.shape
        split = x.reshape(*shape[:-1], units, shape[-1] // units)
        view = gate.view(gate.shape[0], *([1] * (x.dim() - 2)), units, 1).to(x.dtype)
        return ((split * view).reshape(shape), *args[1:])

    return hook


def gate_gradients(
    model: nn.Module, data: Any, targets: Mapping[str, tuple[nn.Module, int]], *, max_batches: int
) -> dict[str, Tensor]:
    """``E_x |∂L(x)/∂ξ_u|`` for the units of every target (Michel et al. 2019).

    Args:
        model: an attnkit model (called as the trainer calls it, see :func:`attnkit.train.modeling.forward`).
        data: an iterable of :class:`~attnkit.data.tasks.Batch`.
        targets: name -> ``(linear, units)``: the linear layer whose input features are the
            ``units`` unit outputs, each ``in_features // units`` wide.
        max_batches: batches of ``data`` to use.

    Returns:
        name -> ``(units,)`` float64 scores.
    """
    from attnkit.models.stack import TransformerStack
    from attnkit.train.modeling import forward

    batches = _batches(data, max_batches)
    first = next(model.parameters())
    device, dtype = first.device, first.dtype if first.is_floating_point() else torch.float32
    gates: dict[str, Tensor] = {}
    handles = [linear.register_forward_pre_hook(_gate_hook(gates, name, n)) for name, (linear, n) in targets.items()]
    stacks = [m for m in model.modules() if isinstance(m, TransformerStack)]
    saved = (model.training, [s.recompute for s in stacks])
    totals = {name: torch.zeros(n, dtype=torch.float64) for name, (_, n) in targets.items()}
    examples = 0
    try:
        model.eval()  # no dropout: the score is of the model as it will run
        for s in stacks:
            s.recompute = False  # reversible layers: ordinary autograd, so the gates get gradients
        for batch in batches:
            batch = batch.to(device)
            gates.clear()
            for name, (_, n) in targets.items():
                gates[name] = torch.ones(batch.size, n, device=device, dtype=dtype, requires_grad=True)
            with torch.enable_grad():
                loss = per_example_loss(forward(model, batch), batch.labels).sum()
                grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
            for name, grad in zip(gates, grads):
                if grad is None:
                    raise ValueError(f"{name} took no part in the forward pass, so it cannot be scored")
                totals[name] += grad.abs().sum(dim=0).double().cpu()
            examples += batch.size
    finally:
        for handle in handles:
            handle.remove()
        model.train(saved[0])
        for s, recompute in zip(stacks, saved[1]):
            s.recompute = recompute
    return {name: total / examples for name, total in totals.items()}


def normalise_per_layer(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each layer's scores divided by their l2 norm (left alone when all are zero)."""
    return {name: s / s.norm() if float(s.norm()) > 0 else s for name, s in scores.items()}


def choose_global(scores: Mapping[str, Tensor], amount: float, *, unit: str) -> dict[str, list[int]]:
    """The ``round(amount * total)`` lowest-scoring units over all layers, each layer keeping one.

    Ties are broken by layer order, then unit index, so the choice is deterministic.

    Raises:
        ValueError: when that many cannot go without emptying a layer (naming ``amount``).
    """
    total = sum(int(s.numel()) for s in scores.values())
    count = round(amount * total)
    removable = total - len(scores)
    if count > removable:
        raise ValueError(
            f"amount={amount} asks to remove {count} of {total} {unit}, but every layer must keep at least one: "
            f"at most {removable} can go (amount <= {removable / total:.3f})"
        )
    ranked = sorted(
        (float(value), layer, index)
        for layer, s in enumerate(scores.values())
        for index, value in enumerate(s.tolist())
    )
    names = list(scores)
    left = {name: int(s.numel()) for name, s in scores.items()}
    removed: dict[str, list[int]] = {name: [] for name in names}
    taken = 0
    for _, layer, index in ranked:
        if taken == count:
            break
        name = names[layer]
        if left[name] == 1:
            continue
        removed[name].append(index)
        left[name] -= 1
        taken += 1
    return {name: sorted(r) for name, r in removed.items()}


def parse_explicit(
    amount: Mapping[Any, Any], sizes: Mapping[str, int], *, unit: str, layers_hint: str
) -> dict[str, list[int]]:
    """``{layer: [indices]}`` with layers given by position in ``sizes`` or by module path.

    Raises:
        ValueError: unknown layers, bad or repeated indices, or a layer left with nothing (naming ``amount``).
    """
    names = list(sizes)
    removed: dict[str, list[int]] = {}
    for key, indices in amount.items():
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(names):
                raise ValueError(
                    f"amount: layer {key} is out of range; the model has {len(names)} such layers ({layers_hint})"
                )
            name = names[key]
        elif isinstance(key, str) and key in sizes:
            name = key
        else:
            raise ValueError(f"amount: {key!r} is neither a layer index nor a module path; {layers_hint}")
        size = sizes[name]
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
            raise ValueError(f"amount[{key!r}] must be a list of {unit} indices, got {indices!r}")
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size]
        if bad:
            raise ValueError(f"amount[{key!r}]: {unit} {bad} do not exist; {name} has {size} (0..{size - 1})")
        if len(set(indices)) != len(indices):
            raise ValueError(f"amount[{key!r}] lists a {unit[:-1]} twice: {list(indices)}")
        if name in removed:
            raise ValueError(f"amount names layer {name} twice")
        if len(indices) >= size:
            raise ValueError(
                f"amount[{key!r}] would remove all {size} {unit} of {name}; every layer must keep at least one"
            )
        removed[name] = sorted(indices)
    return removed


def require_float_linears(modules: Mapping[str, nn.Module]) -> None:
    """Refuse structured pruning of layers whose weights are no longer plain ``nn.Linear``.

    Raises:
        ValueError: naming the first such module (checked before anything is changed).
    """
    for path, module in modules.items():
        if type(module) is not nn.Linear:
            raise ValueError(
                f"model: {path} is a {type(module).__name__}, not an nn.Linear: structured pruning slices float "
                "weights, so prune before quantizing (then quantize the pruned model)"
            )


def slice_linear(linear: nn.Module, *, rows: Tensor | None = None, columns: Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding some output rows and/or input columns of ``linear``.

    Raises:
        ValueError: ``linear`` is not an ``nn.Linear`` (e.g. already quantized).
    """
    if type(linear) is not nn.Linear:
        raise ValueError(
            f"structured pruning slices nn.Linear weights, found {type(linear).__name__}; "
            "prune before quantizing (quantize the pruned model afterwards)"
        )
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new
