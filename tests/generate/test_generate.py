"""Greedy and sampled generation: padding on either side, EOS, streaming, token filters, errors."""

from __future__ import annotations

import pytest
import torch

from attnkit import EncoderDecoder, LanguageModel, TransformerConfig
from attnkit.generate import filter_logits, next_tokens

CFG = TransformerConfig(vocab_size=19, dim=32, depth=2, heads=4, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(CFG).eval()


def test_greedy_equals_argmax_loop(model: LanguageModel) -> None:
    prompt = torch.tensor([[3, 5, 7]])
    seq = prompt.clone()
    for _ in range(6):  # the definition of greedy decoding, recomputed from scratch
        with torch.no_grad():
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(model.generate(prompt, 6), seq)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("position", ["rotary", "learned", "alibi"])
def test_padded_batch_equals_rows_alone(side: str, position: str) -> None:
    torch.manual_seed(1)
    lm = LanguageModel(CFG.replace(position=position)).eval()
    prompts = [[4, 9, 2, 11, 5], [7, 1], [8, 8, 3]]
    width = max(map(len, prompts))
    pad = [[0] * (width - len(p)) for p in prompts]
    rows = [(q + p if side == "left" else p + q) for p, q in zip(prompts, pad)]
    mask = [
        ([0] * len(q) + [1] * len(p) if side == "left" else [1] * len(p) + [0] * len(q)) for p, q in zip(prompts, pad)
    ]
    batched = lm.generate(torch.tensor(rows), 7, attention_mask=torch.tensor(mask, dtype=torch.bool))
    for i, p in enumerate(prompts):
        alone = lm.generate(torch.tensor([p]), 7)
        assert batched[i, width:].tolist() == alone[0, len(p) :].tolist(), f"row {i}"
        assert batched[i, width - len(p) : width].tolist() == p  # prompts come back left-aligned


def test_eos_stops_rows_and_pads(model: LanguageModel) -> None:
    prompt = torch.tensor([[3, 5, 7], [2, 2, 2]])
    free = model.generate(prompt, 8)
    eos = int(free[0, 4])  # the second token row 0 generates becomes "EOS"
    out = model.generate(prompt, 8, eos_token_id=eos, pad_token_id=1)
    row0 = out[0, 3:].tolist()
    first = row0.index(eos)
    assert row0[: first + 1] == free[0, 3 : 4 + first].tolist()
    assert all(t == 1 for t in row0[first + 1 :])


def test_streamer_sees_every_token(model: LanguageModel) -> None:
    seen: list[torch.Tensor] = []
    out = model.generate(torch.tensor([[1, 2]]), 5, streamer=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 2:])


def test_seeded_sampling_is_reproducible_and_varies(model: LanguageModel) -> None:
    prompt = torch.tensor([[3, 4]])
    runs = [model.generate(prompt, 10, temperature=1.5, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    greedy = model.generate(prompt, 10)
    assert torch.equal(model.generate(prompt, 10, top_k=1, generator=torch.Generator().manual_seed(3)), greedy)
    assert torch.equal(model.generate(prompt, 10, temperature=0.0), greedy)


def test_filter_logits_by_hand() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    inf = float("-inf")
    top2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(top2[0, :2]).all() and (top2[0, 2:] == inf).all()
    # nucleus 0.6: 0.5 alone is short of 0.6, so 0.5 and 0.2 stay
    nucleus = filter_logits(logits, top_p=0.6)
    assert torch.isfinite(nucleus[0, :2]).all() and (nucleus[0, 2:] == inf).all()
    # exactly reaching the threshold: 0.5 + 0.2 + 0.15 = 0.85 keeps three
    assert torch.isfinite(filter_logits(logits, top_p=0.85 - 1e-6)[0]).sum() == 3
    assert torch.isfinite(filter_logits(logits, top_p=0.01)[0]).sum() == 1  # always the best token
    scaled = filter_logits(logits, temperature=2.0)
    torch.testing.assert_close(scaled, logits / 2.0)


def test_sampling_frequencies_match_the_tempered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    draws = next_tokens(logits, temperature=0.7, generator=g)
    freq = torch.bincount(draws, minlength=4).double() / 40000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64) / 0.7, dim=0)
    # 5 standard errors of a binomial proportion
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / 40000).sqrt() + 1e-9).all()
    top_p_draws = next_tokens(logits, top_p=0.8, generator=g)
    assert set(top_p_draws.unique().tolist()) <= {0, 1}  # p = 0.66, 0.24, ...: the nucleus is {0, 1}


def test_encoder_decoder_generation_and_start_token() -> None:
    torch.manual_seed(2)
    model = EncoderDecoder(CFG.replace(bos_token_id=1)).eval()
    src = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    src_mask = src != 0
    out = model.generate(src, 6, src_mask=src_mask)
    # greedy, recomputed from scratch for row 1 alone (no padding)
    tgt = torch.tensor([[1]])
    memory = model.encode(src[1:, :2])
    for _ in range(6):
        with torch.no_grad():
            tgt = torch.cat([tgt, model.decode(tgt, memory)[:, -1:].argmax(-1)], dim=1)
    assert out[1].tolist() == tgt[0, 1:].tolist()
    with pytest.raises(ValueError, match="decoder_start_token_id is needed"):
        EncoderDecoder(CFG.replace(pad_token_id=None)).generate(src, 2)


def test_training_mode_is_restored(model: LanguageModel) -> None:
    model.train()
    model.generate(torch.tensor([[1, 2]]), 2)
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"temperature": -1.0}, "temperature must be a number >= 0"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
        ({"num_beams": 0}, "num_beams must be a positive integer"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences must be at most num_beams=2"),
        ({"num_beams": 2, "temperature": 0.7}, "beam search"),
        ({"temperature": 0, "top_k": 3}, "temperature=0 means greedy decoding, which would ignore top_k/top_p"),
        ({"temperature": 0.0, "top_p": 0.9}, "temperature=0 means greedy decoding"),
        ({"num_beams": 2, "streamer": print}, "streamer works with greedy"),
        ({"eos_token_id": 19}, r"eos_token_id must be a token id in \[0, 19\)"),
        ({"pad_token_id": -1}, "pad_token_id must be a token id"),
        ({"use_cache": "yes"}, "use_cache must be a bool"),
        ({"length_penalty": "long"}, "length_penalty must be a number"),
    ],
)
def test_bad_arguments_name_themselves(model: LanguageModel, kwargs: dict, message: str) -> None:
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 2]]), **args)


def test_bad_prompt_is_rejected(model: LanguageModel) -> None:
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model.generate(torch.tensor([1, 2]), 3)
    with pytest.raises(ValueError, match="attention_mask must be a bool tensor of shape"):
        model.generate(torch.tensor([[1, 2]]), 3, attention_mask=torch.ones(1, 3, dtype=torch.bool))
