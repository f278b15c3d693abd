"""With ``full`` (and exact sparse mechanisms whose pattern covers the sequence) every family equals Transformers' own attention."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.hf.helpers import (  # noqa: E402
    CAUSAL_FAMILIES,
    EXACT_SPARSE,
    FAMILIES,
    RTOL,
    covering_options,
    outputs,
    padded_batch,
    positions,
    relative_error,
    tiny,
    with_mechanism,
)

LENGTHS = [9, 12, 5]  # batch > 1, rows of different lengths; 12 = the padded length


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("side", [None, "left", "right"])
def test_full_equals_transformers_attention(family: str, implementation: str, side: str | None) -> None:
    reference = tiny(family, attn_implementation=implementation)
    bridged = with_mechanism(tiny(family), "full")
    ids, mask = padded_batch(LENGTHS if side else [12, 12, 12], side=side or "right")
    kwargs = {"position_ids": positions(mask)}
    ref, out = outputs(reference, ids, mask, **kwargs), outputs(bridged, ids, mask, **kwargs)
    real = mask.bool()
    assert relative_error(out[real], ref[real]) <= RTOL
    if family == "bert":  # the classification head reads the first token: compare rows where it is real
        with torch.no_grad():
            head_ref = reference(ids, attention_mask=mask, **kwargs).logits
            head_out = bridged(ids, attention_mask=mask, **kwargs).logits
        first_real = mask[:, 0].bool()
        assert first_real.any()
        assert relative_error(head_out[first_real], head_ref[first_real]) <= RTOL


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mechanism", ["full", *EXACT_SPARSE])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_each_row_alone(family: str, mechanism: str, side: str) -> None:
    # Reference: Transformers' own attention on each row alone, unpadded.
    reference = tiny(family)
    bridged = with_mechanism(reference, mechanism, **covering_options(mechanism, max(LENGTHS)))
    ids, mask = padded_batch(LENGTHS, side=side, seed=1)
    out = outputs(bridged, ids, mask, position_ids=positions(mask))
    for row in range(len(LENGTHS)):
        real = mask[row].bool()
        alone = outputs(reference, ids[row : row + 1, real])
        assert relative_error(out[row, real], alone[0]) <= RTOL, f"row {row}"


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_hybrid_changes_only_the_chosen_layers(family: str) -> None:
    reference = tiny(family)
    hybrid = with_mechanism(reference, "linear", layers=[1])
    ids, mask = padded_batch(LENGTHS, side="left", seed=2)
    kwargs = {"attention_mask": mask, "position_ids": positions(mask), "output_hidden_states": True}
    with torch.no_grad():
        ref, out = reference(ids, **kwargs).hidden_states, hybrid(ids, **kwargs).hidden_states
    real = mask.bool()
    # hidden_states[1] leaves layer 0 (Transformers' attention through the bridge's base path)
    assert relative_error(out[1][real], ref[1][real]) <= RTOL
    # layer 1 runs linear attention: a different function
    assert relative_error(out[2][real], ref[2][real]) > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_cross_attention_layers_keep_transformers_attention(family: str) -> None:
    # Decoders with cross-attention: the self-attention layers run ``full`` through the bridge, the
    # cross-attention layers Transformers' own attention (the bridge's base path, with its own mask).
    decoder = {"add_cross_attention": True, **({"is_decoder": True} if family == "bert" else {})}
    reference = tiny(family, **decoder)
    if family == "bert":  # a decoder needs the language-model head
        reference = transformers.BertLMHeadModel(reference.config).eval()
    bridged = with_mechanism(reference, "full")
    ids, mask = padded_batch(LENGTHS, side="left", seed=19)
    encoder = torch.randn(len(LENGTHS), 5, 64, generator=torch.Generator().manual_seed(20))
    encoder_mask = torch.ones(len(LENGTHS), 5, dtype=torch.long)
    encoder_mask[1, 3:] = 0
    kwargs = {"position_ids": positions(mask), "encoder_hidden_states": encoder, "encoder_attention_mask": encoder_mask}
    real = mask.bool()
    out, ref = outputs(bridged, ids, mask, **kwargs), outputs(reference, ids, mask, **kwargs)
    assert relative_error(out[real], ref[real]) <= RTOL
