"""Generated-text metrics that are right in every language: BLEU, chrF and ROUGE.

BLEU counts word n-grams, so what a "word" is decides the score. Chinese and Japanese are
written without spaces: with the default ``13a`` tokenizer a whole Chinese sentence is one
"word", and a hypothesis that differs by one character scores 0. This module picks the
tokenizer from the target language:

======================  =============================  ======================================
language                BLEU tokenizer (sacreBLEU)     ROUGE tokens
======================  =============================  ======================================
Chinese (``zh``)        ``zh`` (each Han character     each CJK character; runs of other
                        a token, other text as 13a)    letters/digits as words
Japanese (``ja``)       ``ja-mecab`` when installed    as Chinese
                        (``pip install sacrebleu[ja]``),
                        else ``char``
Korean (``ko``)         ``ko-mecab`` when installed,   as Chinese (Hangul syllables)
                        else ``char``
Thai, Lao, Khmer,       ``char`` (no word spaces)      each character
Burmese
anything else           ``13a`` (sacreBLEU's default)  runs of letters/digits, lower-cased
======================  =============================  ======================================

When no language is given, it is read from the references' script (kana → Japanese, Hangul →
Korean, Han → Chinese, Thai/Lao/Khmer/Burmese letters → character level), so
``bleu(["猫坐在垫子上了"], ["猫坐在垫子上"])`` is 80.9, not 0. ``tokenize=`` overrides the choice.

chrF (Popović 2015) works on character n-grams and needs no tokenizer; ``word_order=2`` gives
chrF++. ROUGE (Lin 2004) is ``rouge-score``'s implementation with the tokenizer above (its own
tokenizer keeps only ``[a-z0-9]``, which drops every CJK character and splits ``für`` into
``f`` and ``r``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import cache

__all__ = ["bleu", "bleu_tokenizer", "chrf", "rouge", "rouge_tokens", "text_language"]

#: Languages whose words are written without spaces: BLEU and ROUGE work on characters.
_CHARACTER_LANGUAGES = frozenset({"th", "lo", "km", "my"})
_CJK = frozenset({"zh", "ja", "ko"})
#: Share of a text's letters in a script at which the text counts as written in it.
_SCRIPT_SHARE = 0.2

# Unicode blocks by script (enough to tell the languages above apart).
_KANA = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))
_HANGUL = ((0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F))
_HAN = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))
_NO_SPACE_SCRIPTS = ((0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1780, 0x17FF), (0x1000, 0x109F))


def _in(code: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= code <= hi for lo, hi in ranges)


def _check_pair(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need as many hypotheses as references (> 0), got {len(hypotheses)} and {len(references)}")
    for name, texts in (("hypotheses", hypotheses), ("references", references)):
        bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] must be a str (detokenized text), got {type(texts[bad]).__name__}")


def base_language(language: str) -> str:
    """``"zh_CN"``, ``"zh-Hant"``, ``"ZH"`` → ``"zh"``: the ISO 639 code the choice depends on."""
    if not isinstance(language, str) or not language.strip():
        raise ValueError(f"language must be a language code such as 'de', 'zh' or 'ja', got {language!r}")
    return re.split(r"[-_@.]", language.strip().lower(), maxsplit=1)[0]


def text_language(texts: Sequence[str]) -> str | None:
    """The language the scoring depends on, read from the script of ``texts``.

    Returns ``"ja"`` (any kana among the letters' share), ``"ko"`` (Hangul), ``"zh"`` (Han
    without kana), ``"th"`` for the scripts written without spaces (Thai, Lao, Khmer, Burmese),
    or ``None`` (space-separated words: nothing special is needed).
    """
    counts = {"kana": 0, "hangul": 0, "han": 0, "nospace": 0, "letters": 0}
    for text in texts:
        for char in text:
            if not char.isalpha():
                continue
            counts["letters"] += 1
            code = ord(char)
            if _in(code, _KANA):
                counts["kana"] += 1
            elif _in(code, _HANGUL):
                counts["hangul"] += 1
            elif _in(code, _HAN):
                counts["han"] += 1
            elif _in(code, _NO_SPACE_SCRIPTS):
                counts["nospace"] += 1
    letters = counts["letters"]
    if not letters:
        return None
    cjk = counts["kana"] + counts["hangul"] + counts["han"]
    if cjk / letters >= _SCRIPT_SHARE:
        if counts["kana"]:
            return "ja"
        return "ko" if counts["hangul"] >= counts["han"] else "zh"
    if counts["nospace"] / letters >= _SCRIPT_SHARE:
        return "th"
    return None


@cache
def _mecab_available(language: str) -> bool:
    from sacrebleu.metrics import BLEU

    try:
        BLEU(tokenize=f"{language}-mecab").corpus_score(["a"], [["a"]])
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def bleu_tokenizer(language: str | None) -> str:
    """sacreBLEU's tokenizer for text in ``language`` (``None``: ``13a``); see the module table."""
    if language is None:
        return "13a"
    code = base_language(language)
    if code == "zh":
        return "zh"
    if code in ("ja", "ko"):
        return f"{code}-mecab" if _mecab_available(code) else "char"
    if code in _CHARACTER_LANGUAGES:
        return "char"
    return "13a"


def _language(language: str | None, references: Sequence[str]) -> str | None:
    return text_language(references) if language is None else base_language(language)


def bleu(
    hypotheses: Sequence[str], references: Sequence[str], *, language: str | None = None, tokenize: str | None = None
) -> float:
    """Corpus BLEU (0-100) of detokenized hypotheses against one reference each.

    Args:
        hypotheses: generated texts.
        references: one reference text per hypothesis.
        language: the target language (``"de"``, ``"zh_CN"``, ...); ``None`` reads it from the
            references' script.
        tokenize: a sacreBLEU tokenizer name (``"13a"``, ``"zh"``, ``"char"``, ``"intl"``, ...)
            that overrides the choice from ``language``.
    """
    from sacrebleu.metrics import BLEU

    _check_pair(hypotheses, references)
    name = tokenize if tokenize is not None else bleu_tokenizer(_language(language, references))
    try:
        metric = BLEU(tokenize=name)
    except (ValueError, KeyError, RuntimeError, ImportError) as error:
        raise ValueError(f"tokenize={name!r} is not a usable sacreBLEU tokenizer here: {error}") from error
    return float(metric.corpus_score(list(hypotheses), [list(references)]).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str], *, word_order: int = 0) -> float:
    """Corpus chrF (0-100; character 6-grams, beta 2); ``word_order=2`` gives chrF++."""
    from sacrebleu.metrics import CHRF

    _check_pair(hypotheses, references)
    if word_order not in (0, 1, 2):
        raise ValueError(f"word_order must be 0 (chrF), 1 or 2 (chrF++), got {word_order!r}")
    return float(CHRF(word_order=word_order).corpus_score(list(hypotheses), [list(references)]).score)


_WORD = re.compile(r"[^\W_]+")


def _is_character_token(char: str, language: str | None) -> bool:
    code = ord(char)
    if language in _CJK:
        return _in(code, _HAN) or _in(code, _KANA) or _in(code, _HANGUL)
    return language in _CHARACTER_LANGUAGES and char.isalpha()


def rouge_tokens(text: str, language: str | None = None) -> list[str]:
    """The tokens ROUGE counts in ``text``: lower-cased (NFKC) words, and single characters for
    scripts written without spaces (see the module table)."""
    text = unicodedata.normalize("NFKC", text).lower()
    code = None if language is None else base_language(language)
    tokens: list[str] = []
    for match in _WORD.finditer(text):
        word = match.group()
        run = ""
        for char in word:
            if _is_character_token(char, code):
                if run:
                    tokens.append(run)
                    run = ""
                tokens.append(char)
            else:
                run += char
        if run:
            tokens.append(run)
    return tokens


class _Tokenizer:
    """The ``tokenize(text)`` object ``rouge_score.RougeScorer`` takes."""

    def __init__(self, language: str | None) -> None:
        self.language = language

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text, self.language)


def rouge(hypotheses: Sequence[str], references: Sequence[str], *, language: str | None = None) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0-1), tokenized for ``language``.

    ``language=None`` reads the language from the references' script (see the module table).
    """
    from rouge_score import rouge_scorer

    _check_pair(hypotheses, references)
    names = ("rouge1", "rouge2", "rougeL")
    code = _language(language, references)
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=False, tokenizer=_Tokenizer(code))
    totals = dict.fromkeys(names, 0.0)
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)
        for name in names:
            totals[name] += scores[name].fmeasure
    return {name: totals[name] / len(references) for name in names}
