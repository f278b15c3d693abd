"""A model's own sliding window (Mistral, Qwen2 ``sliding_attention`` layers) is honoured exactly or refused."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tests.hf.helpers import RTOL, outputs, padded_batch, positions, relative_error, tiny, with_mechanism

WINDOW = 4
LENGTHS = [13, 9, 4]


def _compare(model, reference, side: str = "left") -> float:
    ids, mask = padded_batch(LENGTHS, side=side, seed=16)
    kwargs = {"position_ids": positions(mask)}
    real = mask.bool()
    return relative_error(outputs(model, ids, mask, **kwargs)[real], outputs(reference, ids, mask, **kwargs)[real])


@pytest.mark.parametrize("mechanism", ["sliding_window", "full"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_mistral_window_equals_transformers(mechanism: str, side: str) -> None:
    # sliding_window brings the same window; full receives the window as a mask.
    reference = tiny("mistral", sliding_window=WINDOW)
    options = {"window": WINDOW} if mechanism == "sliding_window" else {}
    assert _compare(with_mechanism(reference, mechanism, **options), reference, side) <= RTOL


def test_a_narrower_window_inside_the_model_window_is_that_window() -> None:
    # Reference: the same weights in a Mistral whose own window is the narrower one.
    model = with_mechanism(tiny("mistral", sliding_window=WINDOW), "sliding_window", window=WINDOW - 1)
    assert _compare(model, tiny("mistral", sliding_window=WINDOW - 1)) <= RTOL


def test_the_window_is_not_a_plain_causal_mask() -> None:
    # The comparisons above would be vacuous if the window changed nothing at these lengths.
    assert _compare(tiny("mistral", sliding_window=WINDOW), tiny("mistral")) > 1e-2


@pytest.mark.parametrize(
    ("mechanism", "options", "message"),
    [
        ("sliding_window", {"window": WINDOW + 1}, r"apply it with window <= 4"),
        ("sliding_window", {"window": 3, "dilation": 2}, r"reaches 5"),
        ("linear", {}, r"sliding window of 4 positions.*cannot honour"),
    ],
)
def test_a_mechanism_that_would_see_past_the_window_is_refused(mechanism: str, options: dict, message: str) -> None:
    model = with_mechanism(tiny("mistral", sliding_window=WINDOW), mechanism, **options)
    ids, mask = padded_batch(LENGTHS, side="left", seed=17)
    with pytest.raises(ValueError, match=message):
        outputs(model, ids, mask)


def test_a_window_longer_than_the_sequence_binds_nothing() -> None:
    # Mistral's configs often carry sliding_window=4096: shorter inputs run any causal mechanism.
    # Reference: the same weights without a window.
    long_window = with_mechanism(tiny("mistral", sliding_window=max(LENGTHS)), "linear")
    assert _compare(long_window, with_mechanism(tiny("mistral"), "linear")) == 0.0
    with pytest.raises(ValueError, match="cannot honour"):
        _compare(with_mechanism(tiny("mistral", sliding_window=max(LENGTHS) - 1), "linear"), tiny("mistral"))


def test_qwen2_mixed_full_and_sliding_layers() -> None:
    # Layer 0 is a full-attention layer, layer 1 a sliding one (max_window_layers=1).
    qwen = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}
    reference = tiny("qwen2", **qwen)
    assert reference.config.layer_types == ["full_attention", "sliding_attention"]
    assert _compare(with_mechanism(reference, "full"), reference) <= RTOL
    assert _compare(with_mechanism(reference, "sliding_window", window=WINDOW, layers=[1]), reference) <= RTOL
