"""``attnkit generate``: outputs equal model.generate / beam search scored by a teacher-forced forward pass,
run folders, labelled output, device and argument errors before anything is printed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.cli import generate as generate_cli
from attnkit.cli.main import main
from attnkit.data.tokenizers import ByteTokenizer
from attnkit.train import load_config

CFG = attnkit.TransformerConfig(vocab_size=260, dim=32, depth=1, heads=2, eos_token_id=2, pad_token_id=0)
REPO = Path(__file__).resolve().parents[2]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``attnkit generate ARGS``; returns (exit code, stdout, stderr)."""
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def until_eos(ids: list[int], eos: int | None = 2) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm")
    attnkit.LanguageModel(CFG).save_pretrained(path)
    return path


def test_json_output_equals_model_generate(lm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, str(lm_dir), "--ids", "5 6 7", "--ids", "9", "--max-new-tokens", "6", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    model = attnkit.LanguageModel.from_pretrained(lm_dir)
    assert [r["prompt_index"] for r in rows] == [0, 1]
    for prompt, row in zip([[5, 6, 7], [9]], rows):
        expected = until_eos(model.generate(torch.tensor([prompt]), 6)[0, len(prompt) :].tolist())
        assert row["prompt_ids"] == prompt and row["ids"] == expected and row["text"] is None
        assert row["rank"] == 1 and row["score"] is None


def test_streams_byte_level_text(lm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, str(lm_dir), "--prompt", "ab", "--max-new-tokens", "5", "--top-k", "1")
    assert code == 0
    model = attnkit.LanguageModel.from_pretrained(lm_dir)
    tok = ByteTokenizer()
    new = until_eos(model.generate(torch.tensor([tok.encode("ab")]), 5)[0, 2:].tolist())
    assert out == "ab" + tok.decode(new) + "\n"
    assert f"loaded {lm_dir} (a model folder)" in err  # said on stderr, so stdout stays the text alone
    code, out, _ = cli(capsys, str(lm_dir), "--ids", "5 6", "--max-new-tokens", "4")
    ids = until_eos(model.generate(torch.tensor([[5, 6]]), 4)[0, 2:].tolist())
    assert out == "".join(f" {i}" for i in ids) + "\n"


def test_saved_tokenizer_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    attnkit.LanguageModel(CFG).save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    code, out, _ = cli(capsys, str(tmp_path), "--prompt", "hi", "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["prompt_ids"] == ByteTokenizer().encode("hi")


# ------------------------------------------------------------------ labelled output


def test_several_prompts_are_labelled(lm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, str(lm_dir), "--prompt", "ab", "--prompt", "xyz", "--max-new-tokens", "4")
    assert code == 0
    model = attnkit.LanguageModel.from_pretrained(lm_dir)
    tok = ByteTokenizer()
    expected = []
    for i, prompt in enumerate(["ab", "xyz"]):
        new = until_eos(model.generate(torch.tensor([tok.encode(prompt)]), 4)[0, len(prompt) :].tolist())
        expected += [f"== prompt {i + 1} of 2: {prompt!r} ==", prompt + tok.decode(new)]
    assert out == "\n".join(expected) + "\n"


def teacher_forced_score(model: attnkit.LanguageModel, prompt: list[int], new: list[int], alpha: float) -> float:
    """sum log p(new | prompt) / len(new) ** alpha from one float64 forward pass over prompt + new."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + new])).double()[0], dim=-1)
    total = sum(float(logp[len(prompt) - 1 + i, token]) for i, token in enumerate(new))
    return total / len(new) ** alpha


def test_beam_hypotheses_are_labelled_with_rank_and_score(lm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--ids", "5 6", "--ids", "7", "--max-new-tokens", "3", "--num-beams", "3", "--num-return-sequences", "2"]
    args += ["--length-penalty", "0.5"]
    code, out, _ = cli(capsys, str(lm_dir), *args, "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    model = attnkit.LanguageModel.from_pretrained(lm_dir).eval()
    assert [(r["prompt_index"], r["rank"]) for r in rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for row in rows:
        new = row["ids"] + ([2] if len(row["ids"]) < 3 else [])  # a hypothesis shorter than 3 ended in EOS
        expected = teacher_forced_score(model, row["prompt_ids"], new, 0.5)
        assert row["score"] == pytest.approx(expected, abs=1e-5)
    assert rows[0]["score"] >= rows[1]["score"] and rows[2]["score"] >= rows[3]["score"]

    code, out, _ = cli(capsys, str(lm_dir), *args)
    lines = out.splitlines()
    headers = [line for line in lines if line.startswith(("==", "--"))]
    assert headers == [
        "== prompt 1 of 2: ids [5, 6] ==",
        f"-- beam 1 of 2, score {rows[0]['score']:.4f} --",
        f"-- beam 2 of 2, score {rows[1]['score']:.4f} --",
        "== prompt 2 of 2: ids [7] ==",
        f"-- beam 1 of 2, score {rows[2]['score']:.4f} --",
        f"-- beam 2 of 2, score {rows[3]['score']:.4f} --",
    ]
    assert lines[2] == " ".join(map(str, rows[0]["ids"]))
    assert "beam score: sum of the log-probabilities" in lines[-1]


def test_encoder_decoder_beam_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(2)
    model = attnkit.EncoderDecoder(CFG.replace(bos_token_id=1))
    model.save_pretrained(tmp_path)
    code, out, _ = cli(capsys, str(tmp_path), "--ids", "5 6", "--num-beams", "2", "--max-new-tokens", "4", "--json")
    assert code == 0
    row = json.loads(out)
    expected = model.eval().generate(torch.tensor([[5, 6]]), 4, num_beams=2)[0].tolist()
    assert row["ids"] == until_eos(expected) and row["rank"] == 1 and isinstance(row["score"], float)


# ------------------------------------------------------------------ run folders


def save_model(directory: Path, seed: int, *, with_state: bool = False) -> attnkit.LanguageModel:
    torch.manual_seed(seed)
    model = attnkit.LanguageModel(CFG)
    model.save_pretrained(directory)
    if with_state:
        (directory / "state.pt").write_bytes(b"")  # what marks a checkpoint complete
    return model.eval()


def scored(model: attnkit.LanguageModel) -> tuple[list[int], float]:
    """Best beam and its score for prompt [5, 6]: the score tells apart models whose greedy text is alike."""
    sequences, scores = model.beam_search(torch.tensor([[5, 6]]), 4, num_beams=2)
    return until_eos(sequences[0, 2:].tolist()), float(scores[0])


def run_scored(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[tuple[list[int], float], str]:
    code, out, err = cli(capsys, *args, "--ids", "5 6", "--max-new-tokens", "4", "--num-beams", "2", "--json")
    assert code == 0, err
    row = json.loads(out)
    return (row["ids"], row["score"]), err


def test_run_folder_weights_are_chosen_and_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    models = {
        "best": save_model(run / "best", 10),
        "final": save_model(run / "model", 11),
        "last": save_model(run / "checkpoints" / "step_00000020", 12, with_state=True),
    }
    save_model(run / "checkpoints" / "step_00000010", 13, with_state=True)
    save_model(run / "checkpoints" / "step_00000030", 14)  # no state.pt: an interrupted write, never chosen
    (run / "best" / "metrics.json").write_text(json.dumps({"step": 15, "loss": 1.25, "accuracy": 0.5}))
    expected = {name: scored(model) for name, model in models.items()}
    assert len({score for _, score in expected.values()}) == 3  # the three are told apart by their output
    folders = {"best": run / "best", "final": run / "model", "last": run / "checkpoints" / "step_00000020"}
    for which in (None, "best", "final", "last"):
        got, err = run_scored(capsys, str(run), *(["--weights", which] if which else []))
        chosen = which or "best"
        assert got[0] == expected[chosen][0] and got[1] == pytest.approx(expected[chosen][1], abs=1e-9), which
        assert f"loaded {folders[chosen]} (" in err
        if chosen == "best":
            assert "(the best validation score: step 15, loss 1.25, accuracy 0.5)" in err

    shutil.rmtree(run / "best")  # no best/ yet: the final weights, then the newest checkpoint
    got, err = run_scored(capsys, str(run))
    assert got[1] == pytest.approx(expected["final"][1], abs=1e-9) and "the final weights" in err
    shutil.rmtree(run / "model")
    got, err = run_scored(capsys, str(run))
    assert got[1] == pytest.approx(expected["last"][1], abs=1e-9) and "the newest checkpoint, step 20" in err
    code, out, err = cli(capsys, str(run), "--ids", "5", "--weights", "best")
    assert code == 2 and out == ""
    assert "--weights best: the run" in err and "has no such weights (it has: last)" in err


def test_run_folder_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    code, _, err = cli(capsys, str(run), "--ids", "5")
    assert code == 2 and "holds no weights yet" in err
    save_model(run / "model", 0)
    code, _, err = cli(capsys, str(run / "model"), "--ids", "5", "--weights", "final")
    assert code == 2 and "--weights final picks weights inside a training run folder" in err
    code, _, err = cli(capsys, str(tmp_path), "--ids", "5")
    assert code == 2 and "holds neither config.json nor a training run" in err
    code, _, err = cli(capsys, str(tmp_path / "missing"), "--ids", "5")
    assert code == 2 and "does not exist" in err


def test_folder_written_by_attnkit_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run folder a real (tiny) training run writes: best/ is chosen by default, model/ with --weights final."""
    from attnkit.train import TrainConfig, Trainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 20)
    config = TrainConfig(
        task=str(corpus),
        out_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=2,
        seq_len=16,
        eval_every=1,
        eval_examples=2,
        checkpoint_every=2,
        warmup_steps=1,
        progress=False,
        threads=1,
        model={"dim": 16, "depth": 1, "heads": 2},
    )
    Trainer(config).fit()
    capsys.readouterr()  # what training printed
    run = tmp_path / "run"
    for flags, folder in (([], run / "best"), (["--weights", "final"], run / "model")):
        code, out, err = cli(capsys, str(run), "--prompt", "def", "--max-new-tokens", "5", *flags)
        assert code == 0 and f"loaded {folder} (" in err
        model = attnkit.LanguageModel.from_pretrained(folder)
        tokenizer = ByteTokenizer()  # what the run saved (tokenizer = "byte")
        new = model.generate(torch.tensor([tokenizer.encode("def")]), 5)[0, 3:].tolist()
        assert out == "def" + tokenizer.decode(until_eos(new, model.config.eos_token_id)) + "\n"


def test_help_example_names_the_folder_the_example_config_writes() -> None:
    """The run folder in --help's examples is the out_dir of the config the example trains."""
    trained = re.search(r"attnkit train (\S+)", generate_cli.EXAMPLES)
    assert trained is not None
    out_dir = load_config(REPO / trained.group(1)).out_dir
    folders = re.findall(r"attnkit generate (\S+)", generate_cli.EXAMPLES)
    assert folders and all(f == out_dir or f.startswith(out_dir + "/") for f in folders)


# ------------------------------------------------------------------ errors, before anything is printed


def test_corrupt_weights_are_reported_as_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_model(tmp_path, 0)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    code, out, err = cli(capsys, str(tmp_path), "--ids", "5")
    assert code == 2 and out == "" and "is not a readable safetensors file (truncated or corrupt?)" in err


def test_missing_cuda_is_named_before_loading(
    lm_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code, out, err = cli(capsys, str(lm_dir), "--prompt", "ab", "--device", "cuda")
    assert code == 2 and out == ""
    assert "--device cuda: CUDA is not available on this machine" in err and "run with --device cpu" in err
    assert "corrupt" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, out, err = cli(capsys, str(lm_dir), "--prompt", "ab", "--device", "cuda:3")
    assert (
        code == 2 and out == "" and "--device cuda:3: this machine has 1 CUDA device(s); available: cpu, cuda:0" in err
    )
    code, _, err = cli(capsys, str(lm_dir), "--prompt", "ab", "--device", "gpu")
    assert code == 2 and "--device must be cpu, cuda, cuda:N or mps, got 'gpu'" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
        (["--top-p", "2"], "--top-p must be a number in (0, 1]"),
        (["--temperature", "-1"], "--temperature must be a number >= 0"),
        (["--num-beams", "2", "--temperature", "0.7"], "beam search (--num-beams > 1) is deterministic"),
        (["--num-return-sequences", "2"], "--num-return-sequences must be at most --num-beams=1"),
        (["--temperature", "0", "--top-k", "3"], "--temperature=0 means greedy decoding, which would ignore"),
        (["--length-penalty", "2"], "--length-penalty applies to beam search only"),
        (["--seed", "3"], "--seed seeds sampling"),
    ],
)
def test_bad_arguments_fail_before_the_prompt_is_printed(
    lm_dir: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    code, out, err = cli(capsys, str(lm_dir), "--prompt", "ab", *flags)
    assert code == 2 and out == "" and message in err


def test_learned_positions_limit_is_checked_before_streaming(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(3)
    model = attnkit.LanguageModel(CFG.replace(position="learned", max_len=8, eos_token_id=None)).eval()
    model.save_pretrained(tmp_path)
    prompt = torch.tensor([[5, 6, 7]])
    for new_tokens in (6, 7):  # the model itself is the oracle: 3 + 6 - 1 = 8 positions fit, 3 + 7 - 1 do not
        try:
            model.generate(prompt, new_tokens)
            fits = True
        except ValueError:
            fits = False
        code, out, err = cli(capsys, str(tmp_path), "--ids", "5 6 7", "--max-new-tokens", str(new_tokens))
        assert (code == 0) == fits, err
        if not fits:
            assert out == "" and "learned positions stop at max_len=8" in err


def test_other_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    attnkit.Encoder(CFG).save_pretrained(tmp_path / "enc")
    code, _, err = cli(capsys, str(tmp_path / "enc"), "--ids", "5")
    assert code == 2 and "holds a Encoder, which does not generate" in err
    small = tmp_path / "small"
    attnkit.LanguageModel(CFG.replace(vocab_size=20)).save_pretrained(small)
    code, _, err = cli(capsys, str(small), "--prompt", "x")
    assert code == 2 and "too small for byte-level tokens" in err
    code, _, err = cli(capsys, str(small), "--ids", "3 x")
    assert code == 2 and "--ids must be space-separated integers" in err
    code, out, err = cli(capsys, str(small), "--ids", "3 25")
    assert code == 2 and out == "" and "--ids: token id 25 is outside the model's vocabulary [0, 20)" in err


def test_generation_controls_reach_the_model(lm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = attnkit.LanguageModel.from_pretrained(lm_dir)
    tok = ByteTokenizer()
    prompt = tok.encode("ab")
    options = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 3}
    expected = until_eos(model.generate(torch.tensor([prompt]), 12, **options)[0, 2:].tolist())  # type: ignore[arg-type]
    code, out, _ = cli(
        capsys,
        str(lm_dir),
        "--prompt",
        "ab",
        "--max-new-tokens",
        "12",
        "--json",
        "--repetition-penalty",
        "1.5",
        "--no-repeat-ngram-size",
        "2",
        "--min-new-tokens",
        "3",
    )
    assert code == 0 and json.loads(out)["ids"] == expected
    # A stop string ends the continuation at the token that completes it (brute force on the text).
    free = until_eos(model.generate(torch.tensor([prompt]), 12)[0, 2:].tolist())
    text = tok.decode(free)
    stop = text[2:4] if len(text) >= 4 else text[-1:]
    cut = next(i for i in range(1, len(free) + 1) if stop in tok.decode(free[:i]))
    code, out, _ = cli(capsys, str(lm_dir), "--prompt", "ab", "--max-new-tokens", "12", "--json", "--stop", stop)
    assert code == 0 and json.loads(out)["ids"] == free[:cut]


def test_control_flag_errors(lm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(lm_dir), "--ids", "5", "--stop", "x"]) == 2
    assert "--stop need a tokenizer" in capsys.readouterr().err
    assert main(["generate", str(lm_dir), "--ids", "5", "--min-new-tokens", "99", "--max-new-tokens", "4"]) == 2
    assert "--min-new-tokens=99 exceeds --max-new-tokens=4" in capsys.readouterr().err


def test_the_weights_choices_are_the_run_folders() -> None:
    # The CLI spells the names out (importing attnkit.train would import torch for --help): keep them one list.
    from attnkit.train.runs import RUN_WEIGHTS

    assert generate_cli.RUN_WEIGHTS == RUN_WEIGHTS
