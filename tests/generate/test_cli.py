"""``attnkit generate`` on saved models: JSON output equals model.generate, streaming, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.cli.main import main
from attnkit.data.tokenizers import ByteTokenizer

CFG = attnkit.TransformerConfig(vocab_size=260, dim=32, depth=1, heads=2, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm")
    attnkit.LanguageModel(CFG).save_pretrained(path)
    return path


def test_json_output_equals_model_generate(lm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(lm_dir), "--ids", "5 6 7", "--ids", "9", "--max-new-tokens", "6", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = attnkit.LanguageModel.from_pretrained(lm_dir)
    for prompt, row in zip([[5, 6, 7], [9]], rows):
        expected = model.generate(torch.tensor([prompt]), 6)[0, len(prompt) :].tolist()
        if 2 in expected:
            expected = expected[: expected.index(2)]
        assert row["prompt_ids"] == prompt and row["ids"] == expected and row["text"] is None


def test_streams_byte_level_text(lm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(lm_dir), "--prompt", "ab", "--max-new-tokens", "5", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    model = attnkit.LanguageModel.from_pretrained(lm_dir)
    tok = ByteTokenizer()
    new = model.generate(torch.tensor([tok.encode("ab")]), 5)[0, 2:].tolist()
    if 2 in new:
        new = new[: new.index(2)]
    assert out == "ab" + tok.decode(new) + "\n"
    assert main(["generate", str(lm_dir), "--ids", "5 6", "--max-new-tokens", "4"]) == 0
    ids = model.generate(torch.tensor([[5, 6]]), 4)[0, 2:].tolist()
    if 2 in ids:
        ids = ids[: ids.index(2)]
    assert capsys.readouterr().out == "".join(f" {i}" for i in ids) + "\n"


def test_saved_tokenizer_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    attnkit.LanguageModel(CFG).save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_ids"] == ByteTokenizer().encode("hi")


def test_encoder_decoder_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(2)
    attnkit.EncoderDecoder(CFG.replace(bos_token_id=1)).save_pretrained(tmp_path / "ed")
    assert main(["generate", str(tmp_path / "ed"), "--ids", "5 6", "--num-beams", "2", "--json"]) == 0
    assert "ids" in json.loads(capsys.readouterr().out)
    attnkit.Encoder(CFG).save_pretrained(tmp_path / "enc")
    assert main(["generate", str(tmp_path / "enc"), "--ids", "5"]) == 2
    assert "holds a Encoder, which does not generate" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--ids", "5"]) == 2
    assert "no config.json" in capsys.readouterr().err
    small = tmp_path / "small"
    attnkit.LanguageModel(CFG.replace(vocab_size=20)).save_pretrained(small)
    assert main(["generate", str(small), "--prompt", "x"]) == 2
    assert "too small for byte-level tokens" in capsys.readouterr().err
    assert main(["generate", str(small), "--ids", "3 x"]) == 2
    assert "--ids must be space-separated integers" in capsys.readouterr().err
    assert main(["generate", str(small), "--ids", "3", "--top-p", "2"]) == 2
    assert "top_p must be a number in (0, 1]" in capsys.readouterr().err
