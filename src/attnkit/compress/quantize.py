"""Int8 linear layers: dynamic int8 activations with int8 weights, or int8 weight-only.

Weights are quantized by torchao's ``quantize_`` (``Int8DynamicActivationInt8WeightConfig`` /
``Int8WeightOnlyConfig``: symmetric, one scale per output row, ``s = max|w_row| / 127.5``,
``q = clamp(round(w · (1/s)), -128, 127)``) and then held by :class:`Int8Linear` as plain tensors
(``qweight`` int8 ``(out, in)``, ``scale`` float32 ``(out,)``, ``bias``): its state dict is
safetensors-ready, so a saved quantized model loads back bit for bit without unpickling.

Routes (which kernel runs the layer), chosen automatically and recorded in the result:

- ``"fbgemm"`` (int8_dynamic on CPU, the default there): PyTorch's quantized engine,
  ``torch.ops.quantized.linear_dynamic`` on the same int8 weights. Activations are quantized
  per call to uint8 over the whole input (one scale and zero point per call, 7-bit range
  ``[0, 127]`` as the engine needs without VNNI), int32 accumulation, float rescale:
  ``y = s_x · s_w[j] · Σ_k (x_q[k] - z_x) · w_q[j, k] + b[j]``. Measured on this project's
  2-core AVX2 CPU (one thread, median of 3 alternating rounds, a busy machine): 1024→4096 at
  batch 1: 0.15-0.22 ms against fp32's 0.93-1.08 ms (4.2-7.3x faster), 2.5-2.9x at 64 rows;
  256→1024 at 2048 rows: 1.6x; but 256→1024 at batch 1 is *slower* (0.096 vs 0.054 ms: the
  per-call activation quantization outweighs the smaller weight read). End-to-end figures (a
  whole LM's forward and batch-1 generation) are in ``docs/compress-report/``. It builds its
  packed weight from ``torch.qint8`` tensors, which PyTorch 2.13 marks as deprecated; where that
  engine is missing, ``"auto"`` falls back to ``"torchao"`` and says so.
- ``"torchao"``: torchao's ``Int8Tensor`` linear, per-row symmetric int8 activations
  (``s_x = max|x_row| / 127.5``, rounded the same way). Its int8 GEMM has no fast CPU kernel (an int32 ``matmul``):
  measured 7.4-11.7 ms at 1024→4096, batch 1 (8-11x *slower* than fp32), 18-20x slower at 64 rows;
  ``torch.compile`` made it slower still (256→1024: 0.47 ms vs 0.06 ms fp32). It is the
  route on GPUs, where the int8 GEMM is fast, and the only weight-only route.
- int8 weight-only always runs on ``"torchao"`` (the int8 weights are converted to the
  activation dtype on each call): 4x smaller resident weights, but on this CPU slower than
  fp32 (1024→4096, batch 1: 2.6-10.0 ms vs 0.93-1.08 ms; 64 rows: 0.8-1.0x); PyTorch's
  ``_weight_int8pack_mm`` was slower still here (15.8 ms). Use it for memory, int8_dynamic
  for speed.

:func:`measure_routes` repeats these measurements on the machine at hand.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.compress.records import QuantizeResult, linear_targets, record_of, replace_submodule
from attnkit.core.errors import check_choice, check_positive_int

QUANTIZE_MODES: tuple[str, ...] = ("int8_dynamic", "int8_weight_only")
QUANTIZE_ROUTES: tuple[str, ...] = ("auto", "fbgemm", "torchao")
#: PyTorch 2.13's deprecation notice for ``torch.qint8`` tensors, raised when the fbgemm route packs weights.
_QINT8_DEPRECATION = r".*quantized tensor creation functions.*"
#: fbgemm's dynamic int8 linear, as its one overload: the overload packet re-checks every call in Python.
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default


class _ImportNotices(logging.Filter):
    """Drops torchao's import-time notices that say nothing about int8 on CPU: its CUDA/Triton kernels
    do not load without a GPU, and torch 2.13 deprecates a registration torchao still makes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            ("Failed to load" in message and ".so" in message)
            or "Detected no triton" in message
            or "is an Enum subclass and is now natively supported" in message
        )


def _torchao() -> Any:
    # Only without a GPU: there a failing CUDA kernel library would be worth hearing about.
    names = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree") if not torch.cuda.is_available() else ()
    loggers = [logging.getLogger(name) for name in names]
    notices = _ImportNotices()
    for logger in loggers:
        logger.addFilter(notices)
    try:
        import torchao.quantization as ao
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"quantize needs torchao ({err}); install it with: pip install 'attnkit[compress]' (or pip install torchao)"
        ) from None
    finally:
        for logger in loggers:
            logger.removeFilter(notices)
    return ao


def fbgemm_available() -> bool:
    """Whether PyTorch's quantized CPU engine can pack and run an int8 linear layer here."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        _pack(torch.zeros(8, 8, dtype=torch.int8), torch.ones(8), None)
    except (RuntimeError, AttributeError):
        return False
    return True


def _global_hooks() -> bool:
    """Whether any global module hook is registered (fusing layers would skip their calls).

    PyTorch keeps these registries private (``register_module_forward_hook`` has no public
    reader); should a release rename them, this answers True and the layers run unfused.
    """
    from torch.nn.modules import module as torch_module

    registries = [getattr(torch_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")]
    return any(registry is None or len(registry) > 0 for registry in registries)


def _pack(qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Any:
    """The fbgemm packed weight of int8 ``qweight (out, in)`` with row scales ``scale (out,)``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_QINT8_DEPRECATION)
        # _make_per_channel_quantized_tensor wraps the given integers as they are (no requantization).
        q = torch._make_per_channel_quantized_tensor(
            qweight.cpu(), scale.double().cpu(), torch.zeros(qweight.shape[0], dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.float().cpu())


def choose_route(mode: str, route: str, device: torch.device) -> tuple[str, str]:
    """The route for ``mode`` on ``device``, and why (see the module docstring).

    Raises:
        ValueError: a route that cannot run ``mode`` on ``device``.
    """
    check_choice("mode", mode, QUANTIZE_MODES)
    check_choice("route", route, QUANTIZE_ROUTES)
    if mode == "int8_weight_only":
        if route == "fbgemm":
            raise ValueError("route='fbgemm' runs int8_dynamic only (it quantizes activations); use route='torchao'")
        return "torchao", (
            "int8 weight-only runs on torchao's Int8Tensor (the only weight-only route): 4x smaller resident "
            "weights, but no CPU kernel here beats fp32 (the weights are converted on each call); "
            "use int8_dynamic for speed on CPU"
        )
    if route == "fbgemm":
        if device.type != "cpu":
            raise ValueError(f"route='fbgemm' runs on CPU only, the model is on {device}; use route='torchao'")
        if not fbgemm_available():
            raise ValueError("route='fbgemm': PyTorch's quantized fbgemm engine is not available here; use 'torchao'")
        return "fbgemm", "requested"
    if route == "torchao":
        return "torchao", "requested"
    if device.type != "cpu":
        return "torchao", f"on {device.type}, torchao's int8 GEMM is the fast route"
    if fbgemm_available():
        return "fbgemm", (
            "on CPU, PyTorch's fbgemm int8 GEMM is the fast route (torchao's int8 linear has no fast CPU kernel: "
            "an int32 matmul, measured 10-40x slower than fp32 here); per-call uint8 activations"
        )
    return "torchao", (
        "fbgemm is not available in this PyTorch build, so torchao's int8 linear runs; on CPU it is slower "
        "than fp32 (no fast int8 GEMM kernel)"
    )


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (see the module docstring for the arithmetic of each route).

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether it has a bias.
        mode: ``"int8_dynamic"`` or ``"int8_weight_only"``.
        route: ``"fbgemm"`` (int8_dynamic, CPU) or ``"torchao"``.
        dtype: dtype of the bias (and of the outputs of the torchao route).
        device: where the tensors live.

    Buffers:
        qweight: int8 ``(out_features, in_features)``.
        scale: float32 ``(out_features,)``: ``w ≈ qweight * scale[:, None]``.
        bias: ``(out_features,)`` or absent.
    """

    qweight: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        mode: str,
        route: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.mode = check_choice("mode", mode, QUANTIZE_MODES)
        self.route = check_choice("route", route, ("fbgemm", "torchao"))
        if route == "fbgemm" and mode != "int8_dynamic":
            raise ValueError("route='fbgemm' runs int8_dynamic only; use route='torchao' for int8_weight_only")
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._kernel: tuple[tuple[int, ...], Any] | None = None
        self._fused: tuple[tuple[Any, ...], Any, list[int]] | None = None

    @classmethod
    def from_int8(cls, qweight: Tensor, scale: Tensor, bias: Tensor | None, *, mode: str, route: str) -> Int8Linear:
        """Wrap given int8 weights ``(out, in)``, row scales and bias (copied)."""
        out_features, in_features = qweight.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(
            in_features, out_features, bias=bias is not None, mode=mode, route=route, dtype=dtype, device=qweight.device
        )
        with torch.no_grad():
            layer.qweight.copy_(qweight)
            layer.scale.copy_(scale.reshape(-1))
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def _kernel_key(self) -> tuple[int, ...]:
        # The packed/wrapped weight is rebuilt when the buffers change: in place (load_state_dict,
        # copy_) bumps their version counters; .to()/.cuda() replace them (_apply clears the cache).
        # Read through _buffers, not attribute access: this runs on every call (batch-1 decoding).
        buffers = self._buffers
        qweight, scale, bias = buffers["qweight"], buffers["scale"], buffers["bias"]
        assert qweight is not None and scale is not None
        try:
            return (qweight._version, scale._version, -1 if bias is None else bias._version)
        except RuntimeError:  # inference tensors keep no version counter: rebuild on every call
            return ()

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        self._kernel = None
        self._fused = None
        return super()._apply(fn, recurse)

    def _weight_kernel(self) -> Any:
        key = self._kernel_key()
        if self._kernel is not None and key and self._kernel[0] == key:
            return self._kernel[1]
        if self.route == "fbgemm":
            kernel = _pack(self.qweight, self.scale, self.bias)
        else:
            ao = _torchao()
            from torchao.quantization.quantize_.workflows import QuantizeTensorToInt8Kwargs

            act = QuantizeTensorToInt8Kwargs(granularity=ao.PerRow()) if self.mode == "int8_dynamic" else None
            dtype = self.bias.dtype if self.bias is not None else torch.float32
            kernel = ao.Int8Tensor(
                self.qweight, self.scale.view(-1, 1), [1, self.in_features], dtype, act_quant_kwargs=act
            )
        self._kernel = (key, kernel)
        return kernel

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in_features) -> (..., out_features)`` in ``x``'s dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input must have {self.in_features} features in its last dimension, got {x.shape[-1]}")
        kernel = self._weight_kernel()
        if self.route == "fbgemm":
            if x.device.type != "cpu":
                raise ValueError(f"this Int8Linear runs on the CPU fbgemm route; got an input on {x.device}")
            # Kept to as few calls as possible: at batch-1 decoding the wrapper's Python is a large share
            # of the layer's time. The engine takes float32 input of any rank (leading dims kept);
            # bf16/fp64 activations are computed in float32. reduce_range: 7-bit activations.
            if x.dtype == torch.float32:
                return _LINEAR_DYNAMIC(x.contiguous(), kernel, True)
            return _LINEAR_DYNAMIC(x.to(torch.float32).contiguous(), kernel, True).to(x.dtype)
        return F.linear(x, kernel, self.bias.to(x.dtype) if self.bias is not None else None)

    def fused_forward(self, others: Sequence[nn.Module], x: Tensor) -> tuple[Tensor, ...] | None:
        """``(self(x), *(layer(x) for layer in others))`` as one int8 GEMM, or None where that cannot be done.

        Layers that read the same input (an attention layer's query, key and value projections) are
        packed into one weight of their stacked rows, so the input is quantized once and the engine
        runs once: at batch-1 decoding the fixed cost per call dominates. The result is bit-identical
        to separate calls: the activation's scale and zero point depend on ``x`` only, each output
        row on its own int8 row, its row scale and bias.

        Returns None (the caller runs the layers one by one) unless every layer is an fbgemm
        ``Int8Linear`` of the same input width with no forward hooks, ``x`` is float32 on the CPU
        and the weights carry version counters (not inference tensors).
        """
        if x.dtype != torch.float32 or x.device.type != "cpu" or _global_hooks():
            return None
        if any(type(layer) is not Int8Linear for layer in others):
            return None
        layers: list[Int8Linear] = [self, *(layer for layer in others if isinstance(layer, Int8Linear))]
        for layer in layers:
            if (
                layer.route != "fbgemm"
                or layer.in_features != self.in_features
                or (layer.bias is None) != (self.bias is None)
                or layer._forward_hooks
                or layer._forward_pre_hooks
            ):
                return None
        key = tuple((id(layer), layer._kernel_key()) for layer in layers)
        if any(not versions for _, versions in key):
            return None
        if self._fused is None or self._fused[0] != key:
            biases = [layer.bias for layer in layers if layer.bias is not None]
            kernel = _pack(
                torch.cat([layer.qweight for layer in layers]),
                torch.cat([layer.scale for layer in layers]),
                torch.cat(biases) if biases else None,
            )
            self._fused = (key, kernel, [layer.out_features for layer in layers])
        _, kernel, sizes = self._fused
        return tuple(_LINEAR_DYNAMIC(x.contiguous(), kernel, True).split(sizes, dim=-1))

    def dequantized_weight(self) -> Tensor:
        """The float weight these int8 values stand for: ``qweight * scale[:, None]`` (float32)."""
        return self.qweight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"mode={self.mode}, route={self.route}"
        )


def _applied_by_weight(model: nn.Module) -> dict[str, str]:
    """Linear layers whose parent applies their ``.weight`` directly (an int8 module cannot serve that)."""
    from attnkit.models.transformer import _LMHead

    return {
        f"{name}.proj" if name else "proj": "the LM head applies this weight with F.linear directly, not by calling it"
        for name, module in model.named_modules()
        if isinstance(module, _LMHead)
    }


def quantize(
    model: nn.Module, mode: str = "int8_dynamic", *, modules: list[str] | None = None, route: str = "auto"
) -> tuple[nn.Module, QuantizeResult]:
    """Replace linear layers by :class:`Int8Linear`, in place.

    Args:
        model: any module (an attnkit model, typically after pruning).
        mode: ``"int8_dynamic"`` (int8 weights and per-call int8 activations) or
            ``"int8_weight_only"``.
        modules: paths of the ``nn.Linear`` layers to quantize; default every ``nn.Linear``
            except tied weights and the LM head's output projection (kept in float, said so in
            ``result.skipped``).
        route: ``"auto"`` (fbgemm for int8_dynamic on CPU when available, else torchao),
            ``"fbgemm"`` or ``"torchao"``; the choice and the reason are in the result.

    Returns:
        ``(model, result)``; ``model.compression_record`` lists the int8 layers, so
        :func:`attnkit.compress.save_compressed` / :func:`~attnkit.compress.load_compressed`
        round-trip the model exactly.

    Raises:
        ValueError: a bad ``mode`` or ``route``, a module that is not an ``nn.Linear`` or cannot
            be replaced (naming ``modules``), a route that cannot run here.
        ImportError: torchao is not installed.
    """
    check_choice("mode", mode, QUANTIZE_MODES)
    check_choice("route", route, QUANTIZE_ROUTES)
    by_weight = _applied_by_weight(model)
    targets, skipped = linear_targets(model, modules, action="quantized", refuse=lambda path, _: by_weight.get(path))
    device = next(iter(targets.values())).weight.device
    chosen, reason = choose_route(mode, route, device)
    ao = _torchao()
    config_class = ao.Int8DynamicActivationInt8WeightConfig if mode == "int8_dynamic" else ao.Int8WeightOnlyConfig
    # set_inductor_config=False: do not change torch.compile's global settings behind the caller's back.
    config = config_class(set_inductor_config=False)
    before = sum(lin.weight.numel() * lin.weight.element_size() for lin in targets.values())
    record = record_of(model)
    after = 0
    for path, linear in targets.items():
        ao.quantize_(linear, config)
        weight: Any = linear.weight  # now torchao's Int8Tensor: integers in .qdata, row scales in .scale
        layer = Int8Linear.from_int8(weight.qdata, weight.scale, linear.bias, mode=mode, route=chosen)
        replace_submodule(model, path, layer)
        record.quantized[path] = {"mode": mode, "route": chosen}
        after += layer.qweight.numel() + layer.scale.numel() * layer.scale.element_size()
    return model, QuantizeResult(
        mode=mode,
        route=chosen,
        reason=reason,
        modules=list(targets),
        skipped=skipped,
        weight_bytes_before=before,
        weight_bytes_after=after,
    )


def measure_routes(
    in_features: int = 1024, out_features: int = 4096, *, rows: int = 1, repeats: int = 20, rounds: int = 3
) -> dict[str, float]:
    """Median seconds per call of one linear layer on every route here, measured side by side.

    Each round times every route ``repeats`` times after one warm-up call; the result is the
    median over rounds of each round's median, so a slow phase of a shared machine hits every
    route alike. Keep it small on a shared machine (the torchao dynamic route is slow on CPU).

    Returns:
        ``{"fp32": s, "fbgemm": s (if available), "torchao_dynamic": s, "torchao_weight_only": s}``.
    """
    for name, value in (("in_features", in_features), ("out_features", out_features), ("rows", rows)):
        check_positive_int(name, value)
    check_positive_int("repeats", repeats)
    check_positive_int("rounds", rounds)
    reference = nn.Linear(in_features, out_features)
    calls: dict[str, nn.Module] = {"fp32": reference}
    routes = [("fbgemm", "int8_dynamic")] if fbgemm_available() else []
    routes += [("torchao", "int8_dynamic"), ("torchao", "int8_weight_only")]
    for route, mode in routes:
        holder = nn.Sequential(nn.Linear(in_features, out_features))
        holder[0].load_state_dict(reference.state_dict())
        quantize(holder, mode, route=route)
        calls[route if route == "fbgemm" else f"torchao_{mode.removeprefix('int8_')}"] = holder
    x = torch.randn(rows, in_features)
    medians: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, call in calls.items():
                call(x)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    call(x)
                    times.append(time.perf_counter() - start)
                medians[name].append(sorted(times)[len(times) // 2])
    return {name: sorted(m)[len(m) // 2] for name, m in medians.items()}
