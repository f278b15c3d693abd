"""Int8 quantization against float references of the same integer arithmetic, written out here."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attnkit.compress import Int8Linear, fbgemm_available, quantize
from tests.compress.helpers import lm_batch, tiny_lm

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="PyTorch's fbgemm engine is not available here")


def _layer(seed: int = 0, in_features: int = 48, out_features: int = 24) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, out_features))


def _weight_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: s = max|w_row| / 127.5, q = clamp(round(w · (1 / s)), -128, 127).

    Multiplying by the reciprocal (as torchao does) matters: the largest |w| of a row lands on ±127.5 or
    a float32 step away, and the rounding then goes to the even neighbour or the nearest one."""
    scale = w.abs().amax(dim=1) / 127.5
    return torch.round(w * (1.0 / scale[:, None])).clamp(-128, 127).to(torch.int8), scale


def _integer_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact integer products in int64, returned as float64."""
    return (xq.long() @ wq.long().T).double()


def _fbgemm_reference(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PyTorch's dynamic quantized linear: the whole input as uint8 in [0, 127] (reduce_range), one scale and
    zero point, chosen as ChooseQuantizationParams does; int32 accumulation; float rescale."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    qmin, qmax = 0, 127
    scale = (hi - lo) / (qmax - qmin)  # computed in double, stored as float
    from_min, from_max = qmin - lo / scale, qmax - hi / scale
    err_min, err_max = abs(qmin) - abs(lo / scale), abs(qmax) - abs(hi / scale)
    zero = round(min(max(from_min if err_min < err_max else from_max, qmin), qmax))
    scale32 = torch.tensor(scale, dtype=torch.float32)
    xq = (torch.round(x * (1.0 / scale32)) + zero).clamp(0, 255)  # float32, by the reciprocal, as fbgemm does
    scale32 = float(scale32)
    acc = _integer_matmul(xq - zero, wq)
    return scale32 * acc * w_scale.double() + bias.double()


def _torchao_dynamic_reference(x, wq, w_scale, bias) -> torch.Tensor:
    """torchao's dynamic path: symmetric per-row int8 activations, s_x = max|x_row| / 127.5."""
    x_scale = x.abs().amax(dim=1, keepdim=True) / 127.5
    xq = torch.round(x * (1.0 / x_scale)).clamp(-128, 127)
    return _integer_matmul(xq, wq) * x_scale.double() * w_scale.double() + bias.double()


def _weight_only_reference(x, wq, w_scale, bias) -> torch.Tensor:
    return x.double() @ (wq.double() * w_scale.double()[:, None]).T + bias.double()


ROUTES = [
    pytest.param("int8_dynamic", "fbgemm", _fbgemm_reference, marks=needs_fbgemm, id="dynamic-fbgemm"),
    pytest.param("int8_dynamic", "torchao", _torchao_dynamic_reference, id="dynamic-torchao"),
    pytest.param("int8_weight_only", "torchao", _weight_only_reference, id="weight_only-torchao"),
]


@pytest.mark.parametrize(("mode", "route", "reference"), ROUTES)
def test_int8_linear_equals_the_integer_arithmetic(mode: str, route: str, reference) -> None:
    layer = _layer()
    w, b = layer[0].weight.detach().clone(), layer[0].bias.detach().clone()
    x = torch.randn(5, 48) * 3.0
    with torch.no_grad():
        exact = layer(x).double()
    quantized, result = quantize(layer, mode, route=route)
    q = quantized[0]
    assert isinstance(q, Int8Linear) and (q.mode, q.route, result.route) == (mode, route, route)
    wq, w_scale = _weight_reference(w)
    assert torch.equal(q.qweight, wq)
    torch.testing.assert_close(q.scale, w_scale, rtol=0, atol=0)
    with torch.no_grad():
        got = q(x).double()
    expected = reference(x, wq, w_scale, b)
    tol = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    assert float((exact - expected).abs().max()) > 20 * tol  # the reference is not just the float layer
    # batched inputs keep their leading dimensions
    assert q(x.view(5, 1, 48)).shape == (5, 1, 24)


@needs_fbgemm
def test_fused_projections_equal_the_integer_arithmetic_of_each_layer() -> None:
    torch.manual_seed(3)
    linears = [nn.Linear(48, width) for width in (24, 16, 16)]
    holder = nn.Sequential(*linears)
    floats = [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in linears]
    quantize(holder, "int8_dynamic", route="fbgemm")
    q, k, v = holder
    x = torch.randn(2, 3, 48) * 2.0
    with torch.no_grad():
        fused = q.fused_forward((k, v), x)
        separate = (q(x), k(x), v(x))
    assert fused is not None and [t.shape[-1] for t in fused] == [24, 16, 16]
    for got, alone, (w, b) in zip(fused, separate, floats, strict=True):
        assert torch.equal(got, alone)  # one call for three layers changes no bit
        wq, w_scale = _weight_reference(w)
        expected = _fbgemm_reference(x.reshape(-1, 48), wq, w_scale, b).reshape(2, 3, -1)
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    # the fused weight follows in-place changes of any layer
    with torch.no_grad():
        v.qweight.copy_(-v.qweight.clamp(min=-127))
        refused = q.fused_forward((k, v), x)
        assert refused is not None and torch.equal(refused[2], v(x)) and not torch.equal(refused[2], fused[2])
    # what cannot be fused is left to separate calls (None)
    handle = k.register_forward_hook(lambda *args: None)
    assert q.fused_forward((k, v), x) is None
    handle.remove()
    # a global hook (a profiler's, say) must see every layer's call: no fusion then either
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert q.fused_forward((k, v), x) is None
    handle.remove()
    assert q.fused_forward((k, v), x) is not None
    assert q.fused_forward((k, nn.Linear(48, 4)), x) is None
    assert q.fused_forward((k, v), x.double()) is None


@needs_fbgemm
def test_quantized_attention_gives_the_same_bits_fused_or_not() -> None:
    model = tiny_lm(dtype=torch.float32)
    quantize(model, "int8_dynamic", route="fbgemm")
    ids = lm_batch().input_ids[:1, :6]
    with torch.no_grad():
        fused_logits = model(ids)
        fused_tokens = model.generate(ids, max_new_tokens=4)
        projections = [m.to_q for m in model.modules() if hasattr(m, "to_k")]
        assert projections and all(q._fused is not None for q in projections)  # the fused path ran
        # a forward hook on a key projection turns fusion off for that layer
        handles = [m.to_k.register_forward_hook(lambda *args: None) for m in model.modules() if hasattr(m, "to_k")]
        assert handles
        plain_logits = model(ids)
        plain_tokens = model.generate(ids, max_new_tokens=4)
    for handle in handles:
        handle.remove()
    assert torch.equal(fused_logits, plain_logits) and torch.equal(fused_tokens, plain_tokens)


def test_result_reports_sizes_and_reason() -> None:
    layer = _layer(in_features=64, out_features=32)
    _, result = quantize(layer, "int8_weight_only")
    assert result.weight_bytes_before == 64 * 32 * 4
    assert result.weight_bytes_after == 64 * 32 + 32 * 4
    assert result.route == "torchao" and "weight-only" in result.reason
    assert "3.76x smaller" in str(result)


@needs_fbgemm
def test_auto_route_on_cpu_is_fbgemm_for_dynamic() -> None:
    _, result = quantize(_layer(), "int8_dynamic")
    assert result.route == "fbgemm" and "fbgemm" in result.reason


def test_model_targets_skip_the_lm_head_and_say_why() -> None:
    model = tiny_lm(dtype=torch.float32)
    _, result = quantize(model)
    assert "lm_head.proj" in result.skipped and "tied" in result.skipped["lm_head.proj"]
    assert len(result.modules) == 2 * 6  # q, k, v, out, w_in, w_out per layer
    untied = tiny_lm(dtype=torch.float32, tie_embeddings=False)
    _, result = quantize(untied)
    assert "F.linear" in result.skipped["lm_head.proj"]
    batch = lm_batch()
    with torch.no_grad():  # decoding through the cache still works on int8 layers
        out = untied.generate(batch.input_ids[:1, :4], max_new_tokens=3)
    assert out.shape[-1] >= 4


def test_quantized_model_stays_close_to_float() -> None:
    model = tiny_lm(dtype=torch.float32)
    batch = lm_batch()
    with torch.no_grad():
        before = model(batch.input_ids)
        quantize(model, "int8_weight_only")
        after = model(batch.input_ids)
    assert float((after - before).abs().max()) < 0.05 * float(before.abs().max())


def test_unsupported_modules_and_settings_are_refused() -> None:
    model = tiny_lm(dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"modules: decoder.norm is a LayerNorm; only nn.Linear layers can be quantized"
    ):
        quantize(model, modules=["decoder.norm"])
    with pytest.raises(ValueError, match=r"modules: lm_head.proj cannot be quantized: its weight is tied"):
        quantize(model, modules=["lm_head.proj"])
    untied = tiny_lm(dtype=torch.float32, tie_embeddings=False)
    with pytest.raises(ValueError, match=r"modules: lm_head.proj cannot be quantized: the LM head applies"):
        quantize(untied, modules=["lm_head.proj"])
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize(model, "int4")
    with pytest.raises(ValueError, match="route must be one of"):
        quantize(model, route="cuda")
    with pytest.raises(ValueError, match="route='fbgemm' runs int8_dynamic only"):
        quantize(model, "int8_weight_only", route="fbgemm")
    assert all(type(m) is not Int8Linear for m in model.modules())  # nothing was changed by the refusals


def test_quantizing_twice_finds_nothing_left() -> None:
    layer = _layer()
    quantize(layer)
    with pytest.raises(ValueError, match=r"no nn\.Linear layers that can be quantized"):
        quantize(copy.deepcopy(layer))
