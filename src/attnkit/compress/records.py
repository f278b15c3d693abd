"""What compression did to a model: the structural record that rebuilds it, and the result records.

A structurally pruned or quantized model no longer matches the shapes its
:class:`~attnkit.models.TransformerConfig` describes (the config has one ``heads`` and one
``ff_dim`` for every layer). :class:`CompressionRecord` is the missing part: for each changed
module, which of the *original* heads or channels it keeps, and which linear layers hold int8
weights. It travels on the model (``model.compression_record``), is written next to the weights
as ``compression.json`` by :func:`attnkit.compress.save_compressed`, and
:func:`attnkit.compress.load_compressed` replays it on a freshly built model before loading the
weights, so a saved compressed model loads back exactly.

The result records (:class:`PruneResult`, ...) are what each compression function returns next
to the model: small, JSON-ready, printable, so a report can put gain and cost side by side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

#: Attribute of a model that holds its :class:`CompressionRecord`.
RECORD_ATTRIBUTE = "compression_record"
#: Version of the ``compression.json`` layout.
RECORD_FORMAT = 1


@dataclass
class CompressionRecord:
    """The structural changes made to a model, relative to the model its config builds.

    Attributes:
        heads: attention module path -> the original query-head indices it keeps (ascending).
        ffn: feed-forward module path -> the original hidden channels it keeps (ascending).
        quantized: linear module path -> ``{"mode": ..., "route": ...}`` of its int8 replacement.
    """

    heads: dict[str, list[int]] = field(default_factory=dict)
    ffn: dict[str, list[int]] = field(default_factory=dict)
    quantized: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def structural(self) -> bool:
        """Whether the model's shapes differ from those its config describes."""
        return bool(self.heads or self.ffn or self.quantized)

    def keep(self, kind: str, path: str, kept_now: list[int], current_size: int) -> None:
        """Record that module ``path`` keeps ``kept_now`` of its ``current_size`` current units.

        Indices are stored relative to the original model, so pruning twice composes.
        """
        table: dict[str, list[int]] = getattr(self, kind)
        original = table.get(path, list(range(current_size)))
        table[path] = [original[i] for i in kept_now]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with the format version)."""
        return {"format": RECORD_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "compression record") -> CompressionRecord:
        """Parse :meth:`to_dict`'s output.

        Raises:
            ValueError: another format version, unknown keys or malformed entries (naming ``source``).
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a JSON object, got {type(data).__name__}")
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"{source} has format {data.get('format')!r}; this attnkit reads format {RECORD_FORMAT}")
        known = {f.name for f in dataclasses.fields(cls)} | {"format"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source} has unknown keys {unknown}; expected {sorted(known)}")
        for name in ("heads", "ffn"):
            table = data.get(name, {})
            if not isinstance(table, dict) or not all(
                isinstance(v, list) and all(isinstance(i, int) and i >= 0 for i in v) for v in table.values()
            ):
                raise ValueError(f"{source}: {name!r} must map module paths to lists of non-negative ints")
        quantized = data.get("quantized", {})
        if not isinstance(quantized, dict) or not all(
            isinstance(v, dict) and set(v) == {"mode", "route"} for v in quantized.values()
        ):
            raise ValueError(f"{source}: 'quantized' must map module paths to {{'mode': ..., 'route': ...}}")
        return cls(
            heads={k: list(v) for k, v in data.get("heads", {}).items()},
            ffn={k: list(v) for k, v in data.get("ffn", {}).items()},
            quantized={k: dict(v) for k, v in quantized.items()},
        )


def record_of(model: nn.Module) -> CompressionRecord:
    """The model's :class:`CompressionRecord` (an empty one is attached on first use)."""
    record = getattr(model, RECORD_ATTRIBUTE, None)
    if record is None:
        record = CompressionRecord()
        # A plain attribute, not a submodule or buffer: it is metadata, saved as JSON.
        object.__setattr__(model, RECORD_ATTRIBUTE, record)
    if not isinstance(record, CompressionRecord):
        raise TypeError(f"model.{RECORD_ATTRIBUTE} must be a CompressionRecord, got {type(record).__name__}")
    return record


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def submodule(model: nn.Module, path: str, *, argument: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the offending argument."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{argument}: the model has no module {path!r}") from None


def replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where ``path`` points (``path`` must name a child of some module)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every ``module.attribute`` name holding it (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    return owners


def linear_targets(
    model: nn.Module,
    modules: Sequence[str] | None,
    *,
    action: str,
    refuse: Callable[[str, nn.Linear], str | None] | None = None,
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """The ``nn.Linear`` layers a compression step applies to, and the ones it leaves alone.

    Args:
        model: the model.
        modules: explicit module paths, or None for every suitable ``nn.Linear``.
        action: what is done to them (``"pruned"``, ``"quantized"``), for the messages.
        refuse: an extra rule: ``refuse(path, linear)`` returns why a layer cannot be used, or None.

    Returns:
        ``({path: linear}, {skipped path: reason})``. By default tied weights (and layers
        ``refuse`` rejects) are skipped with their reason; named explicitly, they raise.

    Raises:
        ValueError: an explicit path that does not exist, is not an ``nn.Linear`` or cannot be
            used (naming ``modules``), or no layer at all.
    """
    owners = tied_weights(model)
    if modules is None:
        candidates: dict[str, nn.Module] = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    else:
        if isinstance(modules, str) or not isinstance(modules, Sequence):
            raise ValueError(f"modules must be a list of module paths, got {modules!r}")
        candidates = {name: submodule(model, name, argument="modules") for name in modules}
    chosen: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    for name, module in candidates.items():
        if type(module) is not nn.Linear:
            raise ValueError(
                f"modules: {name} is a {type(module).__name__}; only nn.Linear layers can be {action} "
                f"(list the linear layers, e.g. {name}.<linear>, or leave modules=None for all of them)"
            )
        tied = [o for o in owners[id(module.weight)] if o != f"{name}.weight"]
        reason = f"its weight is tied to {tied[0]}, which would change too" if tied else None
        if reason is None and refuse is not None:
            reason = refuse(name, module)
        if reason is None:
            chosen[name] = module
        elif modules is not None:
            raise ValueError(f"modules: {name} cannot be {action}: {reason}")
        else:
            skipped[name] = reason
    if not chosen:
        raise ValueError(f"the model has no nn.Linear layers that can be {action}")
    return chosen, skipped


@dataclass
class _Result:
    """What the result records share: :meth:`to_dict` (the fields are the subclasses')."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass
class PruneResult(_Result):
    """What a structured pruning call did (heads or feed-forward channels).

    Attributes:
        kind: ``"heads"`` or ``"ffn"``.
        score: importance score used (``"gradient"``, ``"magnitude"`` or ``"given"``).
        units_before: module path -> units (heads or channels) before.
        units_after: module path -> units after.
        removed: module path -> removed unit indices (numbered as before this call).
        importance: module path -> per-unit importance (normalised per layer; empty for ``"given"``).
        parameters_before: distinct model parameters before.
        parameters_after: distinct model parameters after.
    """

    kind: str
    score: str
    units_before: dict[str, int]
    units_after: dict[str, int]
    removed: dict[str, list[int]]
    importance: dict[str, list[float]]
    parameters_before: int
    parameters_after: int

    def __str__(self) -> str:
        before, after = sum(self.units_before.values()), sum(self.units_after.values())
        unit = "heads" if self.kind == "heads" else "channels"
        return (
            f"pruned {before - after} of {before} {unit} ({self.score} score); parameters "
            f"{self.parameters_before:,} -> {self.parameters_after:,} "
            f"({self.parameters_after / max(self.parameters_before, 1):.1%})"
        )


@dataclass
class MagnitudeResult(_Result):
    """What :func:`attnkit.compress.prune_magnitude` did.

    Attributes:
        scope: ``"global"`` or ``"layer"``.
        amount: the requested fraction of zeros.
        sparsity: linear module path -> its weight's fraction of zeros after pruning.
        zeros: weights zeroed in all (counting zeros that were already there).
        total: weights considered in all.
        skipped: module path -> why it was not pruned.
    """

    scope: str
    amount: float
    sparsity: dict[str, float]
    zeros: int
    total: int
    skipped: dict[str, str]

    def __str__(self) -> str:
        return (
            f"magnitude pruning ({self.scope}): {self.zeros:,} of {self.total:,} linear weights are zero "
            f"({self.zeros / max(self.total, 1):.2%}) in {len(self.sparsity)} layers; stored densely, "
            "so the gain is in compressibility, not in speed"
        )


@dataclass
class QuantizeResult(_Result):
    """What :func:`attnkit.compress.quantize` did.

    Attributes:
        mode: ``"int8_dynamic"`` or ``"int8_weight_only"``.
        route: the kernel route the int8 layers run on (``"fbgemm"`` or ``"torchao"``).
        reason: why that route.
        modules: paths of the linear layers now holding int8 weights.
        skipped: module path -> why a linear layer was left in floating point.
        weight_bytes_before: bytes of those layers' weights before.
        weight_bytes_after: bytes of their int8 weights plus scales after.
    """

    mode: str
    route: str
    reason: str
    modules: list[str]
    skipped: dict[str, str]
    weight_bytes_before: int
    weight_bytes_after: int

    def __str__(self) -> str:
        ratio = self.weight_bytes_before / max(self.weight_bytes_after, 1)
        return (
            f"{self.mode} on {len(self.modules)} linear layers via {self.route}: weights "
            f"{self.weight_bytes_before:,} -> {self.weight_bytes_after:,} bytes ({ratio:.2f}x smaller)"
        )


@dataclass
class DistillResult(_Result):
    """What :func:`attnkit.compress.distill` did.

    Attributes:
        steps: optimizer steps taken.
        history: one dict per logged step: ``step``, ``loss`` and each loss component.
        final: the last step's loss components.
        elapsed_s: wall time of the run.
        tokens: input tokens seen (real, unpadded).
    """

    steps: int
    history: list[dict[str, float]]
    final: dict[str, float]
    elapsed_s: float
    tokens: int

    def __str__(self) -> str:
        parts = ", ".join(f"{k}={v:.4f}" for k, v in self.final.items())
        return f"distilled for {self.steps} steps ({self.tokens:,} tokens, {self.elapsed_s:.1f} s): {parts}"
