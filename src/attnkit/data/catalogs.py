"""A parallel corpus that is already on the machine: gettext message catalogs.

Every translated program installs its messages as ``.mo`` files under the system's locale
directories (``/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo``): English source strings
with their human translation. On a typical Linux machine that is tens of thousands of
English→German, French, Chinese and Japanese pairs, which makes a real translation corpus that
needs no download.

* :func:`read_mo` / :func:`read_po` read one catalog (binary ``.mo`` as the GNU gettext manual
  specifies it, little- or big-endian; text ``.po`` with contexts, plurals, continuation lines,
  C escapes; fuzzy and obsolete entries skipped) into :class:`Message` records, decoding with
  the charset the catalog's header declares.
* :func:`find_catalogs` lists the catalogs of a locale (``"de"``, ``"zh_CN"``) under the locale
  directories.
* :func:`parallel_corpus` turns catalogs into clean ``(source, target)`` pairs with a
  train/validation/test split **by catalog** (all of a program's messages land in one split,
  so a test set is not made of near-copies of training messages), removes exact duplicates,
  and drops from validation/test every pair whose English source also occurs in train.
* :func:`write_jsonl` writes them as the ``source``/``target``/``split`` JSONL records that
  ``attnkit train`` reads; :func:`corpus_file` does all of it once per locale and caches the
  file, which is what ``task = "gettext:de"`` in a training config uses.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from attnkit.data.sources import hash_split

__all__ = [
    "LOCALE_DIRS",
    "CatalogError",
    "Message",
    "Pair",
    "cache_dir",
    "corpus_file",
    "find_catalogs",
    "gettext_locale",
    "parallel_corpus",
    "read_catalog",
    "read_mo",
    "read_po",
    "write_jsonl",
]

#: Where gettext catalogs are installed on Linux distributions (searched in this order).
LOCALE_DIRS: tuple[str, ...] = ("/usr/share/locale", "/usr/share/locale-langpack", "/usr/local/share/locale")

#: The ``task`` prefix of a training config that trains on a locale's catalogs (``"gettext:de"``).
TASK_PREFIX = "gettext:"
#: Where :func:`corpus_file` caches corpora (override with ``ATTNKIT_CACHE_DIR``).
CACHE_ENV = "ATTNKIT_CACHE_DIR"

_MO_MAGIC = 0x950412DE
_CONTEXT_SEPARATOR = "\x04"
_PLURAL_SEPARATOR = "\x00"


class CatalogError(ValueError):
    """A catalog that cannot be read; the message names the file (and line, for ``.po``)."""


@dataclass(frozen=True)
class Message:
    """One translated message of a catalog.

    Attributes:
        source: the English message (``msgid``; the singular form for plural messages).
        target: its translation (``msgstr``; the first plural form for plural messages).
        context: the ``msgctxt`` disambiguation, or ``""``.
        catalog: the catalog's domain (its file name without extension, e.g. ``"coreutils"``).
    """

    source: str
    target: str
    context: str
    catalog: str


@dataclass(frozen=True)
class Pair:
    """One training pair of :func:`parallel_corpus`: ``source`` → ``target``, in ``split``."""

    source: str
    target: str
    split: str
    catalog: str


def _charset(header: str, path: Path) -> str:
    match = re.search(r"charset\s*=\s*([-\w.:]+)", header, flags=re.IGNORECASE)
    name = match.group(1) if match else "utf-8"
    if name.upper() == "CHARSET":  # the untouched template value: gettext reads such files as ASCII/UTF-8
        name = "utf-8"
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise CatalogError(
            f"{path}: the header declares charset {name!r}, an encoding Python does not know "
            "(convert the catalog with `msgconv --to-code=UTF-8`)"
        ) from None


def _message(key: str, value: str, catalog: str) -> Message | None:
    context, _, source = key.rpartition(_CONTEXT_SEPARATOR)
    source = source.split(_PLURAL_SEPARATOR, 1)[0]
    target = value.split(_PLURAL_SEPARATOR, 1)[0]
    if not source or not target:  # the header entry, or an untranslated message
        return None
    return Message(source=source, target=target, context=context, catalog=catalog)


def read_mo(path: str | os.PathLike[str]) -> list[Message]:
    """The translated messages of a binary ``.mo`` catalog, in file order.

    Raises:
        CatalogError: naming the file when it is not a ``.mo`` catalog, is truncated, or
            declares an unknown charset.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 20:
        raise CatalogError(f"{path}: {len(data)} bytes is too short for a .mo catalog (a 20-byte header at least)")
    for order in "<>":
        magic, revision, count, originals, translations = struct.unpack(f"{order}5I", data[:20])
        if magic == _MO_MAGIC:
            break
    else:
        raise CatalogError(f"{path}: not a .mo catalog (magic number {data[:4].hex()}, expected 950412de)")
    if revision >> 16 not in (0, 1):
        raise CatalogError(f"{path}: unsupported .mo major revision {revision >> 16} (0 or 1 expected)")

    def entry(table: int, index: int) -> bytes:
        length, offset = struct.unpack(f"{order}2I", data[table + 8 * index : table + 8 * index + 8])
        if table + 8 * index + 8 > len(data) or offset + length > len(data):
            raise CatalogError(f"{path}: truncated (string {index} lies past the end of the file)")
        return data[offset : offset + length]

    raw = [(entry(originals, i), entry(translations, i)) for i in range(count)]
    header = next((value for key, value in raw if key == b""), b"").decode("ascii", errors="replace")
    encoding = _charset(header, path)
    catalog = path.stem
    messages = []
    for index, (key, value) in enumerate(raw):
        try:
            message = _message(key.decode(encoding), value.decode(encoding), catalog)
        except UnicodeDecodeError as error:
            raise CatalogError(f"{path}: message {index} is not valid {encoding}: {error}") from None
        if message is not None:
            messages.append(message)
    return messages


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
_PO_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"\s*$')
_PO_KEYWORD = re.compile(r"^(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+(.*)$")


def _unescape(text: str, path: Path, line_no: int) -> str:
    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        if code in _ESCAPES:
            return _ESCAPES[code]
        if code.isdigit():  # octal escape, up to three digits
            return chr(int(code, 8))
        raise CatalogError(f"{path}:{line_no}: unknown escape \\{code}")

    return re.sub(r"\\([0-7]{1,3}|.)", replace, text)


def _po_string(rest: str, path: Path, line_no: int) -> str:
    match = _PO_STRING.match(rest.strip())
    if match is None:
        raise CatalogError(f"{path}:{line_no}: expected a quoted string, got {rest.strip()!r}")
    return _unescape(match.group(1), path, line_no)


class _PoEntry:
    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.fuzzy = False
        self.current: str | None = None

    def translated(self, catalog: str) -> Message | None:
        if self.fuzzy or "msgid" not in self.fields:
            return None
        target = self.fields.get("msgstr", self.fields.get("msgstr[0]", ""))
        key = self.fields["msgid"]
        if "msgctxt" in self.fields:
            key = self.fields["msgctxt"] + _CONTEXT_SEPARATOR + key
        return _message(key, target, catalog)


def _po_entries(text: str, path: Path) -> list[_PoEntry]:
    entries: list[_PoEntry] = []
    entry = _PoEntry()
    for line_no, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            if stripped.startswith("#,") and "fuzzy" in stripped[2:].replace(",", " ").split():
                if entry.fields:
                    entries.append(entry)
                    entry = _PoEntry()
                entry.fuzzy = True
            elif stripped.startswith("#~"):  # an obsolete entry: its own lines are skipped
                entry.current = None
            continue
        keyword = _PO_KEYWORD.match(stripped)
        if keyword is not None:
            name = keyword.group(1)
            if name in ("msgctxt", "msgid") and any(k.startswith("msgstr") for k in entry.fields):
                entries.append(entry)
                fresh = _PoEntry()
                entry = fresh
            if name in entry.fields:
                raise CatalogError(f"{path}:{line_no}: a second {name} in one entry")
            entry.fields[name] = _po_string(keyword.group(3), path, line_no)
            entry.current = name
        elif stripped.startswith('"'):
            if entry.current is None:
                raise CatalogError(f"{path}:{line_no}: a continuation string outside an entry")
            entry.fields[entry.current] += _po_string(stripped, path, line_no)
        else:
            raise CatalogError(f"{path}:{line_no}: expected msgctxt, msgid, msgstr, a string or a comment")
    if entry.fields:
        entries.append(entry)
    return entries


def read_po(path: str | os.PathLike[str]) -> list[Message]:
    """The translated, non-fuzzy messages of a text ``.po`` catalog, in file order.

    Raises:
        CatalogError: naming the file and line of the first syntax error, or an unknown charset.
    """
    path = Path(path)
    data = path.read_bytes()
    # The header (the entry with an empty msgid) names the encoding of the rest; it is ASCII itself.
    probe = data.decode("ascii", errors="replace")
    header_match = re.search(r'msgid\s+""\s*\nmsgstr\s+((?:".*"\s*\n?)+)', probe)
    encoding = _charset(header_match.group(1) if header_match else "", path)
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        line_no = data[: error.start].count(b"\n") + 1
        raise CatalogError(f"{path}:{line_no}: not valid {encoding} (the charset its header declares)") from None
    messages = []
    for entry in _po_entries(text, path):
        message = entry.translated(path.stem)
        if message is not None:
            messages.append(message)
    return messages


def read_catalog(path: str | os.PathLike[str]) -> list[Message]:
    """:func:`read_mo` or :func:`read_po`, by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mo":
        return read_mo(path)
    if suffix in (".po", ".pot"):
        return read_po(path)
    raise CatalogError(f"{path}: expected a .mo or .po catalog, got a {suffix or 'extension-less'} file")


def find_catalogs(locale: str, roots: Sequence[str | os.PathLike[str]] | None = None) -> list[Path]:
    """The ``.mo`` catalogs of ``locale`` (a locale directory name: ``"de"``, ``"zh_CN"``, ``"pt_BR"``)
    under ``roots`` (default :data:`LOCALE_DIRS`).

    Raises:
        FileNotFoundError: when no catalog of ``locale`` exists under ``roots``, listing the
            locales that do have catalogs.
    """
    if not re.fullmatch(r"[A-Za-z]{2,3}(_[A-Za-z]{2,4})?(@\w+)?", locale or ""):
        raise ValueError(f"locale must be a locale directory name such as 'de' or 'zh_CN', got {locale!r}")
    roots = LOCALE_DIRS if roots is None else roots
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted(Path(root, locale, "LC_MESSAGES").glob("*.mo")):
            found.setdefault(path.name, path)  # the first root wins, as gettext's search order does
    if not found:
        available: dict[str, int] = {}
        for root in roots:
            for path in Path(root).glob("*/LC_MESSAGES/*.mo"):
                available[path.parent.parent.name] = available.get(path.parent.parent.name, 0) + 1
        richest = sorted(available, key=lambda name: -available[name])[:12]
        raise FileNotFoundError(
            f"no gettext catalogs for locale {locale!r} under {', '.join(map(str, roots))}; "
            f"locales with the most catalogs here: {', '.join(richest) or 'none'}"
        )
    return [found[name] for name in sorted(found)]


def _clean(text: str) -> str:
    return " ".join(text.split())


def parallel_corpus(
    catalogs: Iterable[str | os.PathLike[str]],
    *,
    max_chars: int = 200,
    min_chars: int = 2,
) -> list[Pair]:
    """Clean, deduplicated ``source → target`` pairs from catalogs, split by catalog.

    Whitespace runs are collapsed to one space. A pair is kept when both sides have
    ``min_chars``..``max_chars`` characters and the target is not a copy of the source
    (untranslated messages). Each catalog goes to train/validation/test (80/10/10) by a hash
    of its domain name, so one program's messages stay together; exact duplicate pairs are
    kept once (in the first split that has them, train first); a validation/test pair whose
    source also occurs in train is dropped, so nothing is tested on a memorised message.

    Returns:
        pairs in catalog order.
    """
    if max_chars < min_chars or min_chars < 1:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}")
    by_split: dict[str, list[Pair]] = {"train": [], "validation": [], "test": []}
    for path in catalogs:
        path = Path(path)
        split = hash_split(path.stem)
        for message in read_catalog(path):
            source, target = _clean(message.source), _clean(message.target)
            if not (min_chars <= len(source) <= max_chars and min_chars <= len(target) <= max_chars):
                continue
            if source == target:
                continue
            by_split[split].append(Pair(source, target, split, message.catalog))
    seen: set[tuple[str, str]] = set()
    train_sources = {pair.source for pair in by_split["train"]}
    kept: list[Pair] = []
    for split in ("train", "validation", "test"):
        for pair in by_split[split]:
            key = (pair.source, pair.target)
            if key in seen or (split != "train" and pair.source in train_sources):
                continue
            seen.add(key)
            kept.append(pair)
    return kept


def write_jsonl(pairs: Iterable[Pair], path: str | os.PathLike[str]) -> int:
    """Write ``{"source", "target", "split"}`` records (what ``attnkit train`` reads); atomic. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    count = 0
    with temporary.open("w", encoding="utf-8") as out:
        for pair in pairs:
            out.write(
                json.dumps({"source": pair.source, "target": pair.target, "split": pair.split}, ensure_ascii=False)
            )
            out.write("\n")
            count += 1
    os.replace(temporary, path)
    return count


def gettext_locale(task: str) -> str | None:
    """The locale of a ``"gettext:LOCALE"`` task name, or ``None`` for any other task."""
    if not task.startswith(TASK_PREFIX):
        return None
    locale = task[len(TASK_PREFIX) :]
    if not locale:
        raise ValueError(f"task {task!r} names no locale: write gettext:de, gettext:zh_CN, ...")
    return locale


def cache_dir() -> Path:
    """Where built corpora are cached: ``$ATTNKIT_CACHE_DIR``, else ``~/.cache/attnkit``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnkit"


def corpus_file(locale: str, roots: Sequence[str | os.PathLike[str]] | None = None) -> Path:
    """The English→``locale`` corpus of this machine's catalogs as a JSONL file, built once.

    The file lives in the cache directory (``$ATTNKIT_CACHE_DIR``, else
    ``~/.cache/attnkit``) under a name that hashes the catalogs' paths, sizes and modification
    times, so an updated system builds a new one and a run always reads the corpus it names.
    """
    catalogs = find_catalogs(locale, roots)
    fingerprint = hashlib.blake2b(digest_size=8)
    for path in catalogs:
        stat = path.stat()
        fingerprint.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    target = cache_dir() / "gettext" / f"en-{locale}-{fingerprint.hexdigest()}.jsonl"
    if not target.is_file():
        write_jsonl(parallel_corpus(catalogs), target)
    return target
