"""A tiny encoder-decoder learns to reverse (and copy) short sequences inside the test suite.

The exact-match check runs through ``generate`` (greedy, cached), so it also checks that
teacher-forced training and incremental decoding agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit

PAD, BOS, EOS = 0, 1, 2
SYMBOLS, MAX_LEN = 8, 6
VOCAB = 3 + SYMBOLS


def make_batch(n: int, g: torch.Generator, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sources of 2..MAX_LEN symbols (right-padded) and targets ``BOS body EOS`` (padded)."""
    lengths = torch.randint(2, MAX_LEN + 1, (n,), generator=g)
    symbols = torch.randint(3, VOCAB, (n, MAX_LEN), generator=g)
    pos = torch.arange(MAX_LEN)[None]
    src_mask = pos < lengths[:, None]
    src = symbols.masked_fill(~src_mask, PAD)
    if task == "reverse":
        body = src.gather(1, (lengths[:, None] - 1 - pos).clamp(min=0)).masked_fill(~src_mask, PAD)
    else:
        body = src
    tgt = torch.full((n, MAX_LEN + 2), PAD)
    tgt[:, 0] = BOS
    tgt[:, 1 : MAX_LEN + 1] = body
    tgt[torch.arange(n), lengths + 1] = EOS
    return src, src_mask, tgt


def expected_output(src: torch.Tensor, src_mask: torch.Tensor, task: str) -> list[list[int]]:
    rows = []
    for row, mask in zip(src.tolist(), src_mask.tolist()):
        real = [t for t, m in zip(row, mask) if m]
        rows.append((real[::-1] if task == "reverse" else real) + [EOS])
    return rows


def train_and_score(task: str, steps: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and fair to a shared machine
    try:
        torch.manual_seed(0)
        cfg = attnkit.TransformerConfig(
            vocab_size=VOCAB,
            dim=64,
            depth=2,
            heads=4,
            ff_dim=128,
            position="learned",  # absolute positions in the memory make "the k-th last token" easy to find
            max_len=16,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
        model = attnkit.EncoderDecoder(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.15)
        g = torch.Generator().manual_seed(1)
        model.train()
        for _ in range(steps):
            src, src_mask, tgt = make_batch(64, g, task)
            labels = tgt[:, 1:].masked_fill(tgt[:, 1:] == PAD, -100)
            logits = model(src, tgt[:, :-1], src_mask=src_mask)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        src, src_mask, _ = make_batch(400, torch.Generator().manual_seed(99), task)
        out = model.generate(src, MAX_LEN + 1, src_mask=src_mask)
        want = expected_output(src, src_mask, task)
        hits = sum(out[i, : len(w)].tolist() == w for i, w in enumerate(want))
        # The recompute path must produce the same tokens as the cached one.
        assert torch.equal(model.generate(src[:50], MAX_LEN + 1, src_mask=src_mask[:50], use_cache=False), out[:50])
        return hits / len(want)
    finally:
        torch.set_num_threads(threads)


def test_learns_to_reverse() -> None:
    assert train_and_score("reverse", 400) >= 0.99


@pytest.mark.slow
def test_learns_to_copy() -> None:
    assert train_and_score("copy", 400) >= 0.99
