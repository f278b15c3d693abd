"""BLEU, chrF and ROUGE in every language, against scores computed by hand in the test."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from attnkit.metrics import bleu, chrf, rouge, text_language
from attnkit.metrics.text import base_language, bleu_tokenizer, rouge_tokens


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _brute_bleu(hyps: list[list[str]], refs: list[list[str]]) -> float:
    """Papineni et al. 2002 corpus BLEU from token lists, no smoothing (all n-gram counts > 0 here)."""
    matches, totals = [0] * 4, [0] * 4
    for hyp, ref in zip(hyps, refs):
        for n in range(1, 5):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    hyp_len, ref_len = sum(map(len, hyps)), sum(map(len, refs))
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(sum(math.log(m / t) for m, t in zip(matches, totals)) / 4)


def test_chinese_bleu_counts_characters() -> None:
    # The example: 0.0 with space-separated words, (6/7·5/6·4/5·3/4)^(1/4) by characters.
    score = bleu(["猫坐在垫子上了"], ["猫坐在垫子上"])
    assert score == pytest.approx(100 * (3 / 7) ** 0.25, rel=1e-6)
    assert score == pytest.approx(_brute_bleu([list("猫坐在垫子上了")], [list("猫坐在垫子上")]), rel=1e-6)
    assert bleu(["猫坐在垫子上了"], ["猫坐在垫子上"], tokenize="13a") == 0.0  # the override is honoured


def test_japanese_bleu_without_a_dictionary_is_character_level() -> None:
    hyp, ref = "猫がマットの上に座った", "猫がマットの上に座っていた"
    expected_tokenizer = "ja-mecab" if bleu_tokenizer("ja") == "ja-mecab" else "char"
    assert bleu_tokenizer("ja_JP") == expected_tokenizer
    if expected_tokenizer == "char":
        assert bleu([hyp], [ref]) == pytest.approx(_brute_bleu([list(hyp)], [list(ref)]), rel=1e-6)


def test_mixed_corpus_bleu_matches_brute_force() -> None:
    hyps = ["文件已保存", "无法打开文件"]
    refs = ["文件已经保存", "无法打开该文件"]
    assert bleu(hyps, refs, language="zh_CN") == pytest.approx(
        _brute_bleu([list(h) for h in hyps], [list(r) for r in refs]), rel=1e-6
    )


def test_english_and_german_keep_word_bleu() -> None:
    hyps = ["die Datei wurde auf dem Server gespeichert ."]
    refs = ["die Datei wurde auf dem Server nicht gespeichert ."]
    assert bleu_tokenizer("de") == "13a" and bleu_tokenizer(None) == "13a"
    assert bleu(hyps, refs, language="de") == pytest.approx(_brute_bleu([hyps[0].split()], [refs[0].split()]), rel=1e-6)


def test_language_is_read_from_the_script() -> None:
    assert text_language(["猫坐在垫子上"]) == "zh"
    assert text_language(["猫がマットの上に座った"]) == "ja"
    assert text_language(["고양이가 매트 위에 앉았다"]) == "ko"
    assert text_language(["แมวนั่งบนเสื่อ"]) == "th"
    assert text_language(["Die Katze saß auf der Matte", "le chat"]) is None
    assert text_language(["", "123"]) is None
    # A Chinese sentence quoting an English name is still Chinese.
    assert text_language(["请运行 git status 查看状态"]) == "zh"
    assert base_language("zh-Hant") == "zh" and base_language("pt_BR.UTF-8") == "pt"
    with pytest.raises(ValueError, match="language must be a language code"):
        base_language("")


def test_rouge_on_chinese_counts_characters() -> None:
    # ref 6 characters, hyp 7; unigram overlap 6 -> P 6/7, R 1, F 12/13; bigrams 5 of 6 and 5 -> F 10/11;
    # LCS 6 -> F 12/13.
    scores = rouge(["猫坐在垫子上了"], ["猫坐在垫子上"])
    assert scores["rouge1"] == pytest.approx(12 / 13)
    assert scores["rouge2"] == pytest.approx(10 / 11)
    assert scores["rougeL"] == pytest.approx(12 / 13)


def test_rouge_keeps_non_ascii_words_whole() -> None:
    # rouge-score's own tokenizer would split "für" into "f" and "r".
    assert rouge_tokens("Datei für Übersetzer_in!") == ["datei", "für", "übersetzer", "in"]
    # hyp [datei, für] vs ref [datei, für, alle]: P 1, R 2/3 -> F 0.8.
    assert rouge(["Datei für"], ["Datei für alle"])["rouge1"] == pytest.approx(0.8)
    assert rouge_tokens("run git 命令", "zh") == ["run", "git", "命", "令"]
    assert rouge_tokens("ｇｉｔ") == ["git"]  # NFKC folds full-width letters


def test_english_rouge_unchanged() -> None:
    assert rouge(["the cat"], ["the cat sat"])["rouge1"] == pytest.approx(0.8)
    assert rouge(["The Cat"], ["the cat"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_chrf_against_hand_computation() -> None:
    # chrF (sacreBLEU's default): character n-grams n = 1..6 without spaces, precision and recall averaged
    # over the orders both sides have, beta = 2. Hyp "ab" vs ref "abc": n=1 P 2/2 R 2/3, n=2 P 1/1 R 1/2,
    # n>=3 the hypothesis has none. P = 1, R = 7/12, F = (1+b²)PR/(b²P+R) = 35/55.
    p, r = 1.0, (2 / 3 + 1 / 2) / 2
    expected = 100 * 5 * p * r / (4 * p + r)
    assert chrf(["ab"], ["abc"]) == pytest.approx(expected, rel=1e-6)
    assert chrf(["猫坐在垫子上"], ["猫坐在垫子上"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="word_order"):
        chrf(["a"], ["a"], word_order=3)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="as many hypotheses as references"):
        bleu(["a"], [])
    with pytest.raises(TypeError, match=r"hypotheses\[0\] must be a str"):
        rouge([[1, 2]], ["a"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="tokenize='nope'"):
        bleu(["a"], ["a"], tokenize="nope")
