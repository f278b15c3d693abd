"""The four models: shapes, padding invariance, causality, pooling, parameter counts, options."""

from __future__ import annotations

import copy

import pytest
import torch

import attnkit
from attnkit import Encoder, EncoderDecoder, LanguageModel, SequenceClassifier, TransformerConfig

POSITIONS = ["sinusoidal", "learned", "rotary", "alibi", "t5", "none"]


def config(**changes: object) -> TransformerConfig:
    base: dict = {"vocab_size": 37, "dim": 32, "depth": 2, "heads": 4, "num_classes": 3, "max_len": 64}
    return TransformerConfig(**{**base, **changes})


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 37, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_shapes() -> None:
    torch.manual_seed(0)
    cfg = config()
    x, mask = ids(3, 9), torch.ones(3, 9, dtype=torch.bool)
    assert Encoder(cfg)(x, attention_mask=mask).shape == (3, 9, 32)
    assert LanguageModel(cfg)(x, attention_mask=mask).shape == (3, 9, 37)
    assert SequenceClassifier(cfg)(x, attention_mask=mask).shape == (3, 3)
    assert EncoderDecoder(cfg)(x, ids(3, 5), src_mask=mask).shape == (3, 5, 37)


@pytest.mark.parametrize("position", POSITIONS)
def test_left_padding_changes_nothing(position: str) -> None:
    """A left-padded row gives the outputs of the unpadded sequence (positions count real tokens)."""
    torch.manual_seed(1)
    cfg = config(position=position)
    seq = ids(1, 7, seed=1)
    batch = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)  # 3 pads on the left
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, :3] = False
    lm = LanguageModel(cfg).eval()
    torch.testing.assert_close(lm(batch, attention_mask=mask)[:, 3:], lm(seq), atol=1e-5, rtol=1e-5)
    enc = Encoder(cfg).eval()
    torch.testing.assert_close(enc(batch, attention_mask=mask)[:, 3:], enc(seq), atol=1e-5, rtol=1e-5)
    clf = SequenceClassifier(cfg).eval()
    torch.testing.assert_close(clf(batch, attention_mask=mask), clf(seq), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_right_padding_changes_nothing(position: str) -> None:
    torch.manual_seed(2)
    cfg = config(position=position)
    seq = ids(1, 6, seed=2)
    batch = torch.cat([seq, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.arange(10)[None] < 6
    model = EncoderDecoder(cfg).eval()
    tgt = ids(1, 5, seed=3)
    torch.testing.assert_close(model(batch, tgt, src_mask=mask), model(seq, tgt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_language_model_is_causal(position: str) -> None:
    torch.manual_seed(3)
    lm = LanguageModel(config(position=position)).eval()
    x = ids(2, 12, seed=4)
    y = x.clone()
    y[:, 8:] = ids(2, 4, seed=5)
    a, b = lm(x), lm(y)
    assert torch.equal(a[:, :8], b[:, :8]), "logits before position 8 changed when only later tokens changed"
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_decoder_is_causal_and_decode_equals_forward() -> None:
    torch.manual_seed(4)
    model = EncoderDecoder(config()).eval()
    src, tgt = ids(2, 9, seed=6), ids(2, 7, seed=7)
    tgt2 = tgt.clone()
    tgt2[:, 4:] = 1
    a, b = model(src, tgt), model(src, tgt2)
    assert torch.equal(a[:, :4], b[:, :4])
    memory = model.encode(src)
    torch.testing.assert_close(model.decode(tgt, memory), a, atol=0, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_classifier_pooling_by_hand(pooling: str) -> None:
    torch.manual_seed(5)
    cfg = config(pooling=pooling)
    clf = SequenceClassifier(cfg).eval()
    enc = Encoder(cfg).eval()
    enc.load_state_dict({k: v for k, v in clf.state_dict().items() if not k.startswith("head.")})
    x = ids(2, 8, seed=8)
    mask = torch.tensor([[True] * 8, [False] * 2 + [True] * 4 + [False] * 2])
    hidden = enc(x, attention_mask=mask).double()
    rows = []
    for b in range(2):
        real = mask[b].nonzero().flatten().tolist()
        if pooling == "mean":
            rows.append(hidden[b, real].mean(dim=0))
        elif pooling == "first":
            rows.append(hidden[b, real[0]])
        else:
            rows.append(hidden[b, real[-1]])
    expected = torch.stack(rows) @ clf.head.weight.double().T + clf.head.bias.double()
    torch.testing.assert_close(clf(x, attention_mask=mask).double(), expected, atol=1e-5, rtol=0)


def test_parameter_count_closed_form() -> None:
    d, h, v, depth = 32, 128, 37, 2
    per_layer = 4 * d * d + 2 * (2 * d) + (d * h + h + h * d + d)  # attention, two LayerNorms, GELU MLP
    lm = LanguageModel(config(position="rotary"))
    assert lm.num_parameters() == v * d + depth * per_layer + 2 * d  # tied head adds nothing
    untied = LanguageModel(config(tie_embeddings=False))
    assert untied.num_parameters() == lm.num_parameters() + v * d
    assert lm.lm_head.proj.weight is lm.embed.tokens.weight
    assert lm.num_parameters(exclude_embeddings=True) == lm.num_parameters() - v * d
    learned = LanguageModel(config(position="learned"))
    assert learned.num_parameters() == lm.num_parameters() + 64 * d
    grouped = LanguageModel(config(kv_heads=1))  # keys and values: d x (1 head of 8) instead of d x d, twice
    assert grouped.num_parameters() == lm.num_parameters() - depth * 2 * (d * d - d * (d // 4))


def test_summary_lists_layers_and_counts() -> None:
    model = EncoderDecoder(config(depth=2, decoder_depth=3))
    text = repr(model)
    assert text.startswith(f"EncoderDecoder: {model.num_parameters():,} parameters")
    assert text.count("layer ") == 5 and "cross full" in text and "encoder:" in text and "decoder:" in text


def test_per_layer_attention_choice() -> None:
    causal = [n for n in attnkit.list_attention() if attnkit.attention_capabilities(n).causal]
    names = [causal[-1], "full", causal[-1]]
    options = [attnkit.get_spec(n).small_options for n in names]
    lm = LanguageModel(config(depth=3, attention=names, attention_options=options, position="rotary"))
    assert [layer.mechanism for layer in lm.decoder.layer_list()] == names
    assert [layer.self_attention.attention.attention.name for layer in lm.decoder.layer_list()] == names
    assert lm(ids(2, 9)).shape == (2, 9, 37)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_chunked_feed_forward_equals_unchunked(activation: str) -> None:
    torch.manual_seed(6)
    plain = LanguageModel(config(activation=activation)).eval()
    chunked = LanguageModel(config(activation=activation, ff_chunks=3)).eval()
    chunked.load_state_dict(plain.state_dict())
    x = ids(2, 11)
    torch.testing.assert_close(chunked(x), plain(x), atol=1e-6, rtol=0)


def test_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(7)
    plain = LanguageModel(config(dropout=0.1))
    ckpt = LanguageModel(config(dropout=0.1, checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = ids(2, 10)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(11)
        model(x).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_dropout_only_in_training() -> None:
    torch.manual_seed(8)
    lm = LanguageModel(config(dropout=0.3))
    x = ids(2, 8)
    lm.train()
    assert not torch.allclose(lm(x), lm(x))
    lm.eval()
    assert torch.equal(lm(x), lm(x))


def test_rmsnorm_by_hand() -> None:
    torch.manual_seed(9)
    lm = LanguageModel(config(norm="rmsnorm")).eval()
    norm = lm.decoder.norm
    x = torch.randn(3, 32)
    expected = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-6, rtol=0)


def test_bad_inputs_name_the_argument() -> None:
    lm = LanguageModel(config(position="learned", max_len=16))
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor of shape \(B, T\)"):
        lm(torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"input_ids holds token id 37, outside the vocabulary \[0, 37\)"):
        lm(torch.full((1, 3), 37))
    with pytest.raises(ValueError, match="attention_mask must be a bool tensor of shape"):
        lm(ids(2, 5), attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask must be bool"):
        lm(ids(2, 5), attention_mask=torch.full((2, 5), 0.5))
    # float masks are refused, not reinterpreted (an additive 0/-inf mask means the opposite of a 0/1 one)
    additive = torch.zeros(2, 5).masked_fill(torch.tensor([[False] * 5, [False] * 3 + [True] * 2]), float("-inf"))
    for float_mask in (additive, (additive == 0).float()):
        with pytest.raises(ValueError, match=r"attention_mask must be bool.*mask\.bool\(\).*mask == 0"):
            lm(ids(2, 5), attention_mask=float_mask)
    with pytest.raises(ValueError, match="beyond max_len=16"):
        lm(ids(1, 17))
    with pytest.raises(ValueError, match=r"needs config\.num_classes"):
        SequenceClassifier(config(num_classes=None))
    with pytest.raises(TypeError, match=r"config must be an attnkit\.TransformerConfig"):
        LanguageModel({"vocab_size": 3})  # type: ignore[arg-type]
    model = EncoderDecoder(config())
    with pytest.raises(ValueError, match=r"memory must have shape \(B, S, 32\)"):
        model.decode(ids(1, 3), torch.randn(1, 4, 8))
    # integer 0/1 masks are accepted like bool ones
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    torch.testing.assert_close(lm(ids(1, 5), attention_mask=mask), lm(ids(1, 5), attention_mask=mask.bool()))


@pytest.mark.parametrize("name", [n for n in attnkit.list_attention() if not attnkit.attention_capabilities(n).causal])
def test_decoders_reject_non_causal_mechanisms(name: str) -> None:
    options = attnkit.get_spec(name).small_options
    with pytest.raises(ValueError, match="has no causal mode"):
        LanguageModel(config(attention=name, attention_options=options, position="rotary"))


@pytest.mark.parametrize("position", POSITIONS)
def test_empty_inputs_give_empty_outputs(position: str) -> None:
    """T = 0 (and B = 0) returns an empty output like SDPA, with a working backward."""
    torch.manual_seed(9)
    cfg = config(position=position)
    for model, width in ((LanguageModel(cfg), 37), (Encoder(cfg), 32)):
        for batch in (2, 0):
            out = model(ids(batch, 0), attention_mask=torch.ones(batch, 0, dtype=torch.bool))
            assert out.shape == (batch, 0, width) and out.dtype == torch.float32
            out.sum().backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(not g.any() for g in grads)  # the empty output depends on nothing
            model.zero_grad()


def test_empty_steps_in_cached_decoding_change_nothing() -> None:
    torch.manual_seed(10)
    lm = LanguageModel(config(position="rotary")).eval()
    x = ids(2, 7, seed=11)
    cache = lm.new_cache()
    pieces = [lm(x[:, a:b], cache=cache) for a, b in [(0, 0), (0, 3), (3, 3), (3, 4), (4, 7)]]
    assert [p.shape[1] for p in pieces] == [0, 3, 0, 1, 3]
    torch.testing.assert_close(torch.cat(pieces, dim=1), lm(x), atol=1e-5, rtol=1e-5)


def test_encoder_decoder_with_an_empty_side() -> None:
    torch.manual_seed(12)
    model = EncoderDecoder(config()).eval()
    src, tgt = ids(2, 6, seed=13), ids(2, 4, seed=14)
    assert model(src, tgt[:, :0]).shape == (2, 0, 37)
    # An empty source: cross-attention sees no key, its attention output is zero, so the decoder
    # equals a copy whose cross-attention output projections are zeroed, reading any source.
    blind = copy.deepcopy(model)
    for layer in blind.decoder.layers:
        layer.cross_attention.attention.to_out.weight.data.zero_()
    torch.testing.assert_close(model(src[:, :0], tgt), blind(src, tgt), atol=1e-6, rtol=0)


def test_empty_inputs_are_refused_where_nothing_can_be_computed() -> None:
    lm = LanguageModel(config())
    with pytest.raises(ValueError, match="input_ids must not be empty"):
        SequenceClassifier(config())(ids(2, 0))  # nothing to pool
    with pytest.raises(ValueError, match="input_ids must not be empty"):
        lm.generate(ids(2, 0), max_new_tokens=2)  # nothing to continue
