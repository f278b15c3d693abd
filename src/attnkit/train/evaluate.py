"""Evaluation: the metrics that fit the task kind.

* classification: loss, accuracy;
* language modelling: loss, next-token accuracy (on the scored positions only, e.g. MQAR's
  queries or the second copy of the duplication task), perplexity, and bits per character
  for byte-level text;
* seq2seq: teacher-forced loss, token accuracy and perplexity, plus greedy decoding scored
  by exact match, BLEU (sacrebleu) and ROUGE (rouge-score).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.data.pipeline import TrainingData
from attnkit.data.tasks import IGNORE_INDEX, Batch
from attnkit.metrics import MetricAccumulator, bleu, chrf, exact_match, rouge
from attnkit.train.modeling import forward


@torch.no_grad()
def greedy_decode(model: nn.Module, batch: Batch, *, bos_id: int, eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding of an encoder-decoder, recomputing the decoder each step (simple and exact).

    Args:
        model: an :class:`~attnkit.models.EncoderDecoder`.
        batch: a seq2seq batch (its ``input_ids``/``attention_mask`` are the source).
        bos_id: first decoder token.
        eos_id: a row stops after producing it (EOS itself is not returned).
        max_new_tokens: longest output.

    Returns:
        One list of generated ids per row.
    """
    src, src_mask = batch.input_ids, batch.attention_mask
    rows = src.shape[0]
    tokens = torch.full((rows, 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(rows, dtype=torch.bool, device=src.device)
    for _ in range(max_new_tokens):
        logits = model(src, tokens, src_mask=src_mask)  # (B, t, V)
        nxt = logits[:, -1].argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if bool(done.all()):
            break
    out = []
    for row in tokens[:, 1:].tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def _targets(labels: Tensor, eos_id: int) -> list[list[int]]:
    out = []
    for row in labels.tolist():
        row = [y for y in row if y != IGNORE_INDEX]
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    data: TrainingData,
    *,
    device: torch.device | str = "cpu",
    generate: bool = False,
) -> dict[str, Any]:
    """Metrics of ``model`` over ``batches``.

    Args:
        model: the trained model (put in eval mode here and restored after).
        batches: the evaluation set.
        data: the run's data (task kind, tokenizer for text metrics, special ids).
        device: where to run.
        generate: for seq2seq, also decode greedily and report exact match, BLEU and ROUGE.

    Returns:
        ``{"loss", "accuracy", ...}`` (see the module docstring for which keys appear).
    """
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    hypotheses: list[list[int]] = []
    references: list[list[int]] = []
    byte_text = data.tokenizer is not None and data.tokenizer.byte_level and data.kind == "lm"
    try:
        for batch in batches:
            batch = batch.to(device)
            logits = forward(model, batch)
            characters = batch.num_targets if byte_text else 0
            acc.update(logits, batch.labels, characters=characters)
            if generate and data.kind == "seq2seq" and data.bos_id is not None and data.eos_id is not None:
                refs = _targets(batch.labels, data.eos_id)
                hyps = greedy_decode(
                    model, batch, bos_id=data.bos_id, eos_id=data.eos_id, max_new_tokens=max(map(len, refs)) + 1
                )
                hypotheses += hyps
                references += refs
    finally:
        model.train(was_training)
    result: dict[str, Any] = acc.result(perplexity=data.kind != "classification")
    if hypotheses:
        result["exact_match"] = exact_match(hypotheses, references)
        hyp_text = [data.decode(h) for h in hypotheses]
        ref_text = [data.decode(r) for r in references]
        # BLEU's and ROUGE's tokenizer follow the references' script (characters for Chinese/Japanese).
        result["bleu"] = bleu(hyp_text, ref_text)
        result["chrf"] = chrf(hyp_text, ref_text)
        result.update(rouge(hyp_text, ref_text))
    return result
