"""gettext catalogs as a parallel corpus: readers against hand-made files and the stdlib's own reader."""

from __future__ import annotations

import gettext
import json
import struct
from pathlib import Path

import pytest

from attnkit.data.catalogs import (
    CatalogError,
    Message,
    find_catalogs,
    parallel_corpus,
    read_catalog,
    read_mo,
    read_po,
    write_jsonl,
)
from attnkit.data.sources import hash_split

HEADER = "Project-Id-Version: demo\nContent-Type: text/plain; charset={charset}\n"


def write_mo(
    path: Path, entries: list[tuple[str, str]], *, charset: str = "UTF-8", order: str = "<", encoding: str = ""
) -> Path:
    """A .mo file laid out as the GNU gettext manual describes (sorted keys, two offset tables)."""
    entries = sorted([("", HEADER.format(charset=charset)), *entries])
    keys = [k.encode(encoding or charset) for k, _ in entries]
    values = [v.encode(encoding or charset) for _, v in entries]
    n = len(entries)
    originals, translations = 28, 28 + 8 * n
    cursor = 28 + 16 * n
    table_o, table_t, blob = b"", b"", b""
    for strings, is_keys in ((keys, True), (values, False)):
        for s in strings:
            entry = struct.pack(f"{order}2I", len(s), cursor + len(blob))
            if is_keys:
                table_o += entry
            else:
                table_t += entry
            blob += s + b"\0"
    head = struct.pack(f"{order}7I", 0x950412DE, 0, n, originals, translations, 0, 0)
    path.write_bytes(head + table_o + table_t + blob)
    return path


def test_mo_reader_reads_contexts_plurals_and_skips_the_header(tmp_path: Path) -> None:
    path = write_mo(
        tmp_path / "demo.mo",
        [
            ("Open", "Öffnen"),
            ("menu\x04File", "Datei"),
            ("%d file\x00%d files", "%d Datei\x00%d Dateien"),
            ("Untranslated", ""),
        ],
    )
    assert read_mo(path) == [
        Message("%d file", "%d Datei", "", "demo"),
        Message("Open", "Öffnen", "", "demo"),
        Message("File", "Datei", "menu", "demo"),
    ]


def test_mo_reader_big_endian_and_declared_charset(tmp_path: Path) -> None:
    path = write_mo(tmp_path / "latin.mo", [("Size", "Größe")], charset="ISO-8859-1", order=">")
    assert read_mo(path) == [Message("Size", "Größe", "", "latin")]


def test_mo_reader_refuses_bad_files_naming_them(tmp_path: Path) -> None:
    (tmp_path / "short.mo").write_bytes(b"\x00" * 8)
    with pytest.raises(CatalogError, match=r"short\.mo: 8 bytes is too short"):
        read_mo(tmp_path / "short.mo")
    (tmp_path / "text.mo").write_bytes(b"not a catalog at all, just text")
    with pytest.raises(CatalogError, match=r"text\.mo: not a \.mo catalog"):
        read_mo(tmp_path / "text.mo")
    path = write_mo(tmp_path / "odd.mo", [("a", "b")], charset="X-NO-SUCH-CODEC", encoding="ascii")
    with pytest.raises(CatalogError, match=r"odd\.mo: the header declares charset 'X-NO-SUCH-CODEC'"):
        read_mo(path)
    good = write_mo(tmp_path / "cut.mo", [("Open", "Öffnen")])
    (tmp_path / "cut.mo").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CatalogError, match=r"cut\.mo: truncated"):
        read_mo(tmp_path / "cut.mo")


PO = r"""# German translation
msgid ""
msgstr ""
"Project-Id-Version: demo\n"
"Content-Type: text/plain; charset=UTF-8\n"

#: main.c:10
msgid "Open"
msgstr "Öffnen"

#, c-format
msgid ""
"Cannot open %s:\n"
"permission denied"
msgstr "Kann %s nicht öffnen:\n"
"Zugriff verweigert"

#, fuzzy
msgid "Close"
msgstr "Schließen?"

msgctxt "menu"
msgid "File"
msgstr "Datei"

msgid "%d file"
msgid_plural "%d files"
msgstr[0] "%d Datei"
msgstr[1] "%d Dateien"

msgid "Quote \"x\"\tand \\ tab"
msgstr "Zitat \"x\"\tund \\ Tab"

#~ msgid "Old"
#~ msgstr "Alt"

msgid "Empty"
msgstr ""
"""


def test_po_reader_against_hand_made_file(tmp_path: Path) -> None:
    path = tmp_path / "demo.po"
    path.write_text(PO, encoding="utf-8")
    assert read_po(path) == [
        Message("Open", "Öffnen", "", "demo"),
        Message("Cannot open %s:\npermission denied", "Kann %s nicht öffnen:\nZugriff verweigert", "", "demo"),
        Message("File", "Datei", "menu", "demo"),
        Message("%d file", "%d Datei", "", "demo"),
        Message('Quote "x"\tand \\ tab', 'Zitat "x"\tund \\ Tab', "", "demo"),
    ]
    assert read_catalog(path) == read_po(path)


def test_po_reader_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.po"
    path.write_text('msgid "a"\nmsgstr "b"\nnonsense here\n', encoding="utf-8")
    with pytest.raises(CatalogError, match=r"bad\.po:3: expected msgctxt"):
        read_po(path)
    path.write_text('msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n\nmsgid "a"\nmsgstr "\xe9"\n')
    path.write_bytes(path.read_text().encode("latin-1"))
    with pytest.raises(CatalogError, match=r"bad\.po:6: not valid utf-8"):
        read_po(path)
    with pytest.raises(CatalogError, match=r"expected a \.mo or \.po catalog"):
        read_catalog(tmp_path / "notes.txt")


def test_mo_reader_matches_the_standard_library_on_real_catalogs() -> None:
    try:
        paths = find_catalogs("de")[:12]
    except FileNotFoundError:
        pytest.skip("no German gettext catalogs on this machine")
    checked = 0
    for path in paths:
        with path.open("rb") as f:
            reference = gettext.GNUTranslations(f)._catalog  # the stdlib's parser, an independent reader
        for message in read_mo(path):
            key = f"{message.context}\x04{message.source}" if message.context else message.source
            expected = reference.get(key, reference.get((key, 0)))
            assert expected == message.target, (path, key)
            checked += 1
    assert checked > 100


def test_parallel_corpus_splits_by_catalog_and_never_tests_on_training_sources(tmp_path: Path) -> None:
    # Find catalog names that hash to train and to test, so the split is known in advance.
    names = [f"prog{i}" for i in range(200)]
    train_name = next(n for n in names if hash_split(n) == "train")
    test_name = next(n for n in names if hash_split(n) == "test")
    write_mo(tmp_path / f"{train_name}.mo", [("Open", "Öffnen"), ("Close", "Schließen"), ("Same", "Same")])
    write_mo(
        tmp_path / f"{test_name}.mo",
        [("Open", "Aufmachen"), ("Print   the\nfile", "Datei drucken"), ("x", "y"), ("Long " * 60, "Lang")],
    )
    pairs = parallel_corpus(sorted(tmp_path.glob("*.mo")))
    got = {(p.source, p.target, p.split) for p in pairs}
    assert got == {
        ("Open", "Öffnen", "train"),
        ("Close", "Schließen", "train"),
        ("Print the file", "Datei drucken", "test"),
    }
    out = tmp_path / "en-de.jsonl"
    assert write_jsonl(pairs, out) == 3
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {"source": "Close", "target": "Schließen", "split": "train"} in records
    with pytest.raises(ValueError, match="min_chars"):
        parallel_corpus([], min_chars=0)


def test_find_catalogs_explains_what_exists(tmp_path: Path) -> None:
    (tmp_path / "fr" / "LC_MESSAGES").mkdir(parents=True)
    write_mo(tmp_path / "fr" / "LC_MESSAGES" / "demo.mo", [("Open", "Ouvrir")])
    assert find_catalogs("fr", [tmp_path]) == [tmp_path / "fr" / "LC_MESSAGES" / "demo.mo"]
    with pytest.raises(FileNotFoundError, match=r"no gettext catalogs for locale 'de'.*: fr"):
        find_catalogs("de", [tmp_path])
    with pytest.raises(ValueError, match="locale must be a locale directory name"):
        find_catalogs("../etc", [tmp_path])


def test_gettext_task_trains_on_a_locale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from attnkit.data import catalogs
    from attnkit.data.pipeline import build_data

    root = tmp_path / "locale"
    names = [f"prog{i}" for i in range(200)]
    split_name = {split: next(n for n in names if hash_split(n) == split) for split in ("train", "test")}
    for split, name in split_name.items():
        (root / "xx" / "LC_MESSAGES").mkdir(parents=True, exist_ok=True)
        write_mo(root / "xx" / "LC_MESSAGES" / f"{name}.mo", [(f"{split} message", f"{split} Nachricht")])
    monkeypatch.setattr(catalogs, "LOCALE_DIRS", (str(root),))
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = build_data("gettext:xx", tokenizer="byte", seq_len=64)
    assert data.kind == "seq2seq" and data.name == "gettext:xx"
    (example,) = data.eval_examples("test", 5)
    assert data.decode(list(example.input_ids)) == "test message"
    assert data.decode([t for t in example.labels if t != data.eos_id]) == "test Nachricht"
    cached = list((tmp_path / "cache" / "gettext").glob("en-xx-*.jsonl"))
    assert len(cached) == 1 and catalogs.corpus_file("xx") == cached[0]  # built once, then reused
    with pytest.raises(ValueError, match="names no locale"):
        catalogs.gettext_locale("gettext:")


def test_training_config_checks_the_gettext_locale(tmp_path: Path) -> None:
    from attnkit.train.config import load_config

    path = tmp_path / "bad.toml"
    path.write_text('task = "gettext:qq"\nout_dir = "runs/x"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"task.*no gettext catalogs for locale 'qq'"):
        load_config(path)
