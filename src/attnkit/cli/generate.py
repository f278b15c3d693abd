"""``attnkit generate``: continue a prompt with a trained model, streaming the text as it is produced.

MODEL is either a training run folder (the ``out_dir`` of ``attnkit train``: ``best/``,
``model/``, ``checkpoints/step_*/``) or a model folder written by ``model.save_pretrained``
(``config.json`` + ``model.safetensors``). Text goes through the ``tokenizer.json`` saved
next to the weights when there is one, else through byte-level tokens (UTF-8 bytes, ids
offset by the four special tokens; the model's vocabulary must hold them). ``--ids``
bypasses tokenization.

Every argument is checked, and the device and the prompts' lengths too, before anything is
printed or loaded onto the device.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnkit.cli import RUN_WEIGHTS, add_command

#: The command-line name of each ``model.generate`` argument, for error messages.
FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "num_beams": "--num-beams",
    "num_return_sequences": "--num-return-sequences",
    "length_penalty": "--length-penalty",
    "repetition_penalty": "--repetition-penalty",
    "no_repeat_ngram_size": "--no-repeat-ngram-size",
    "min_new_tokens": "--min-new-tokens",
    "stop_strings": "--stop",
    "decode": "a tokenizer (prompts given with --ids have none)",
}

EXAMPLES = """\
examples:
  attnkit train configs/text_stdlib.toml              # writes the run folder runs/text_stdlib
  attnkit generate runs/text_stdlib --prompt 'def ' --max-new-tokens 100 --temperature 0.8
  attnkit generate runs/text_stdlib --weights final --prompt 'import ' --prompt 'class ' --json
  attnkit generate runs/text_stdlib/model --prompt 'def ' --num-beams 4 --num-return-sequences 2
  attnkit generate runs/text_stdlib --prompt 'def ' --repetition-penalty 1.3 --no-repeat-ngram-size 4 --stop '\n\n'
"""


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "generate",
        summary="generate text from a trained language model or encoder-decoder (streams tokens)",
        description=(
            "Continue a prompt (language model) or transform it (encoder-decoder) with a trained model. MODEL is a "
            "training run folder (the out_dir of 'attnkit train'; --weights picks best/, model/ or the newest "
            "checkpoint) or a model folder (config.json + model.safetensors, written by save_pretrained). Greedy by "
            "default; --temperature/--top-k/--top-p sample, --num-beams runs beam search. One prompt is streamed "
            "as it is generated; several prompts and beam hypotheses are printed labelled, and --json prints one "
            "JSON object per output. Which weights were loaded is said on stderr."
        ),
        examples=EXAMPLES,
    )
    parser.add_argument(
        "model", metavar="MODEL", help="a training run folder (e.g. runs/text_stdlib) or a model folder (config.json)"
    )
    parser.add_argument(
        "--weights",
        choices=RUN_WEIGHTS,
        default=None,
        help=(
            "which weights of a run folder: best (best/, the best validation score), final (model/, written when "
            "training finished) or last (the newest checkpoint). Default: the first of these that exists"
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts)")
    source.add_argument("--ids", action="append", help="prompt as space-separated token ids (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (> 0 samples; 0 = greedy)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: no beam search)")
    parser.add_argument(
        "--num-return-sequences",
        type=int,
        default=1,
        help="beam hypotheses to print per prompt, best first, each with its score (at most --num-beams; default 1)",
    )
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        help="beam search only: score = sum of log-probabilities / length ** penalty (default 1.0)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="multiply the log-probability of tokens already in the text by this (> 1 discourages repeats; default 1)",
    )
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="never repeat an n-gram of this many tokens (default 0: off)",
    )
    parser.add_argument("--min-new-tokens", type=int, default=0, help="no end-of-sequence before this many tokens")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop a continuation once its text contains TEXT (repeat for several; backslash escapes such as \\n work)",
    )
    parser.add_argument("--seed", type=int, default=None, help="sampling only: seed of the generator (default 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix at every step (slower)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per output instead of text")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------- arguments


def _sampling(args: argparse.Namespace) -> bool:
    return (args.temperature is not None and args.temperature > 0) or args.top_k is not None or args.top_p is not None


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no model; errors name the flag and say what to do."""
    from attnkit.generate.api import check_search
    from attnkit.generate.controls import check_controls

    length_penalty = 1.0 if args.length_penalty is None else args.length_penalty
    check_search(
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.num_beams,
        length_penalty,
        args.num_return_sequences,
        names=FLAGS,
    )
    check_controls(
        args.repetition_penalty,
        args.no_repeat_ngram_size,
        args.min_new_tokens,
        stop_strings(args),
        None if args.ids else str,  # text prompts come with a tokenizer, id prompts without
        args.max_new_tokens,
        names=FLAGS,
    )
    # Options that would change nothing are refused rather than silently ignored.
    if args.length_penalty is not None and args.num_beams == 1:
        raise ValueError("--length-penalty applies to beam search only: add --num-beams N (N > 1), or drop it")
    if args.seed is not None and not _sampling(args):
        raise ValueError(
            "--seed seeds sampling, and this run decodes deterministically (greedy or beam search): "
            "add --temperature/--top-k/--top-p to sample, or drop --seed"
        )
    if args.ids:
        for text in args.ids:
            _parse_ids(text)


def stop_strings(args: argparse.Namespace) -> list[str]:
    """The ``--stop`` texts with backslash escapes (``\\n``, ``\\t``) turned into characters."""
    import codecs

    return [codecs.decode(text, "unicode_escape") for text in args.stop]


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--ids must be space-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--ids must hold at least one token id, got an empty string")
    return ids


# ---------------------------------------------------------------- which weights


# ---------------------------------------------------------------- prompts


def _load_tokenizer(model_dir: Path, vocab_size: int) -> Any:
    from attnkit.data.tokenizers import TOKENIZER_FILE, ByteTokenizer, load_tokenizer

    if (model_dir / TOKENIZER_FILE).is_file():
        return load_tokenizer(model_dir)
    tokenizer = ByteTokenizer()
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"{model_dir} has no {TOKENIZER_FILE} and its vocabulary ({vocab_size}) is too small for byte-level "
            f"tokens ({tokenizer.vocab_size}); pass token ids with --ids '1 2 3'"
        )
    return tokenizer


def _prompt_ids(args: argparse.Namespace, cfg: Any, tokenizer: Any, language_model: bool) -> list[list[int]]:
    """Token ids of every prompt (BOS first for a language model that has one), checked against the model."""
    prompts = [_parse_ids(t) for t in args.ids] if args.ids else [tokenizer.encode(t) for t in args.prompt]
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            source = "--ids" if args.ids else f"--prompt {args.prompt[i]!r} (tokenized)"
            raise ValueError(f"{source}: token id {bad[0]} is outside the model's vocabulary [0, {cfg.vocab_size})")
        if not ids and not (language_model and cfg.bos_token_id is not None):
            raise ValueError(f"prompt {i + 1} is empty after tokenization; give some text")
    if language_model and cfg.bos_token_id is not None:
        prompts = [[cfg.bos_token_id, *p] for p in prompts]
    return prompts


def check_positions(cfg: Any, prompts: list[list[int]], max_new_tokens: int, language_model: bool) -> None:
    """Refuse a run that would step past learned position embeddings mid-way (other positions have no limit).

    Positions count real tokens from 0, and the last new token is never fed back, so a language
    model needs ``prompt + max_new_tokens - 1`` positions; an encoder-decoder needs the source's
    length and ``max_new_tokens`` (the start token plus all but the last new token).
    """
    if cfg.position != "learned":
        return
    longest = max(map(len, prompts))
    if language_model:
        needs = [(longest + max_new_tokens - 1, "the longest prompt and --max-new-tokens")]
    else:
        needs = [(longest, "the longest source"), (max_new_tokens, "--max-new-tokens")]
    for needed, what in needs:
        if needed > cfg.max_len:
            raise ValueError(
                f"{what} need {needed} positions, but the model's learned positions stop at max_len={cfg.max_len} "
                f"(longest prompt {longest} tokens, --max-new-tokens {max_new_tokens}): lower --max-new-tokens "
                "or shorten the prompt"
            )


# ---------------------------------------------------------------- output


class _TextStreamer:
    """Prints the text of each new token as soon as it decodes to complete characters."""

    def __init__(self, tokenizer: Any, eos: int | None) -> None:
        self.tokenizer = tokenizer
        self.eos = eos
        self.ids: list[int] = []
        self.printed = ""
        self.done = False

    def __call__(self, tokens: Any) -> None:
        token = int(tokens[0])
        if self.done:
            return
        if token == self.eos:
            self.done = True
            return
        self.ids.append(token)
        if self.tokenizer is None:
            sys.stdout.write(f" {token}")
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd"):
                return  # a multi-byte character is still incomplete
            sys.stdout.write(text[len(self.printed) :])
            self.printed = text
        sys.stdout.flush()

    def finish(self) -> None:
        """Print whatever text is still held back (an incomplete character at the end)."""
        if self.tokenizer is not None:
            sys.stdout.write(self.tokenizer.decode(self.ids)[len(self.printed) :])
        sys.stdout.write("\n")
        sys.stdout.flush()


@dataclass(frozen=True)
class Output:
    """One generated sequence: its prompt's index, its rank among that prompt's hypotheses, its beam score."""

    prompt_index: int
    rank: int
    score: float | None
    ids: list[int]


def _outputs(rows: list[list[int]], scores: list[float] | None, prompts: int, eos: int | None) -> list[Output]:
    per_prompt = len(rows) // prompts
    outputs = []
    for i, row in enumerate(rows):
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        score = scores[i] if scores is not None else None
        outputs.append(Output(i // per_prompt, i % per_prompt + 1, score, row))
    return outputs


def _short(text: str, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def print_outputs(
    outputs: list[Output], args: argparse.Namespace, prompts: list[list[int]], tokenizer: Any, language_model: bool
) -> None:
    """Each output under a header naming its prompt (and its beam rank and score), or as JSON lines.

    A language model's text is shown after its prompt, as when streaming; an encoder-decoder's alone.
    """
    per_prompt = len(outputs) // len(prompts)
    for out in outputs:
        prompt_text = args.prompt[out.prompt_index] if args.prompt else None
        text = tokenizer.decode(out.ids) if tokenizer is not None else None
        if args.json:
            record = {
                "prompt_index": out.prompt_index,
                "prompt": prompt_text,
                "prompt_ids": prompts[out.prompt_index],
                "rank": out.rank,
                "score": out.score,
                "ids": out.ids,
                "text": text,
            }
            print(json.dumps(record))
            continue
        if out.rank == 1:
            shown = _short(prompt_text) if prompt_text is not None else f"ids {prompts[out.prompt_index]}"
            print(f"== prompt {out.prompt_index + 1} of {len(prompts)}: {shown} ==")
        if out.score is not None:
            print(f"-- beam {out.rank} of {per_prompt}, score {out.score:.4f} --")
        if text is None:
            print(" ".join(map(str, out.ids)))
        else:
            print((prompt_text if language_model else "") + text)
    if not args.json and outputs[0].score is not None:
        penalty = 1.0 if args.length_penalty is None else args.length_penalty
        print(
            f"(beam score: sum of the log-probabilities of the generated tokens, EOS included, / their number ** "
            f"{penalty:g} (--length-penalty); higher is better)"
        )


# ---------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    from attnkit.train.runs import resolve_weights

    weights = resolve_weights(Path(args.model), args.weights)

    import torch

    from attnkit.cli import check_device
    from attnkit.models import EncoderDecoder, LanguageModel, load_pretrained

    device = check_device(args.device)  # before loading: a missing GPU must not look like a corrupt file
    model = load_pretrained(weights.directory, map_location=device)
    if not isinstance(model, (LanguageModel, EncoderDecoder)):
        raise ValueError(
            f"{weights.directory} holds a {type(model).__name__}, which does not generate; "
            "use a LanguageModel or EncoderDecoder checkpoint"
        )
    cfg = model.config
    language_model = isinstance(model, LanguageModel)
    tokenizer = None if args.ids else _load_tokenizer(weights.directory, cfg.vocab_size)
    prompts = _prompt_ids(args, cfg, tokenizer, language_model)
    check_positions(cfg, prompts, args.max_new_tokens, language_model)

    print(
        f"attnkit generate: loaded {weights.directory} ({weights.description}): {type(model).__name__}, "
        f"{model.num_parameters():,} parameters, on {device}",
        file=sys.stderr,
    )
    width = max(map(len, prompts))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
    inputs = {"attention_mask": mask} if language_model else {"src_mask": mask}
    common: dict[str, Any] = {
        "use_cache": not args.no_cache,
        "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "min_new_tokens": args.min_new_tokens,
        "stop_strings": stop_strings(args),
        "decode": tokenizer.decode if tokenizer is not None else None,
        **inputs,
    }
    new_from = width if language_model else 0  # a language model returns the prompts too

    if args.num_beams > 1:
        sequences, scores = model.beam_search(
            ids,
            args.max_new_tokens,
            num_beams=args.num_beams,
            num_return_sequences=args.num_return_sequences,
            length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
            **common,
        )
        rows, row_scores = sequences[:, new_from:].tolist(), scores.tolist()
    else:
        stream = not args.json and len(prompts) == 1
        streamer = _TextStreamer(tokenizer, cfg.eos_token_id) if stream else None
        generator = torch.Generator(device=device).manual_seed(0 if args.seed is None else args.seed)
        if stream and args.prompt and language_model:
            sys.stdout.write(args.prompt[0])
        out = model.generate(
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
            streamer=streamer,
            **common,
        )
        if streamer is not None:
            streamer.finish()
            return 0
        rows, row_scores = out[:, new_from:].tolist(), None
    print_outputs(_outputs(rows, row_scores, len(prompts), cfg.eos_token_id), args, prompts, tokenizer, language_model)
    return 0
