"""Persona calibration texts: the bundled defaults, user files, and rendering for the model.

A persona is a list of :class:`PersonaText` items. An item is either a chat pair (``prompt`` + ``response``,
the response being what the persona says) or a free-standing first-person statement (``text``).
Calibration runs :func:`render`'s text through the model and, when asked to, keeps the statistics of the
response tokens only (the prompt is context).

File formats accepted by :func:`load_persona_file` (UTF-8, an optional BOM is ignored):

* ``.jsonl``: one JSON object per non-empty line, with ``{"text"}`` or a prompt/response pair under one of
  the key sets ``{"prompt", "response"}``, ``{"instruction", "response"}``, ``{"question", "answer"}``
  (``{"response"}`` with none of the prompt keys is a response without prompt). Other keys are ignored.
* ``.json``: a JSON array of such objects.
* ``.txt``: plain statements. If the file has a blank line between two non-empty lines, items are the
  blank-line-separated paragraphs (lines of a paragraph joined with ``"\\n"``); otherwise every non-empty
  line is one item. Surrounding whitespace is stripped.

Bundled data lives in ``persona_kernels/data/personas/`` (``personas.json`` lists the pairs, system prompts,
descriptions and files) and is read with :mod:`importlib.resources`, so it works from a wheel too.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass
from importlib import resources

try:  # Python >= 3.11
    from importlib.resources.abc import Traversable
except ImportError:  # pragma: no cover - Python 3.10
    from importlib.abc import Traversable

from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Union

from persona_kernels.evaluation.ab import ABItem

__all__ = [
    "PersonaText",
    "ABQuestion",
    "Rendered",
    "PersonaFileError",
    "load_persona_file",
    "load_personas",
    "default_personas",
    "default_pairs",
    "default_pair_names",
    "persona_names",
    "system_prompt",
    "description",
    "load_ab_questions",
    "render",
    "PLAIN_SEPARATOR",
]

PathLike = Union[str, "os.PathLike[str]", Traversable]

#: Separator between system prompt, prompt and response when no chat template is used.
PLAIN_SEPARATOR = "\n\n"

# accepted (prompt key, response key) spellings, in order of preference
_PAIR_KEYS: tuple[tuple[str, str], ...] = (("prompt", "response"), ("instruction", "response"), ("question", "answer"))
_SUFFIXES = (".jsonl", ".json", ".txt")
_AB_FILE = "ab_questions.jsonl"
_META_FILE = "personas.json"
_RESERVED = (_AB_FILE, _META_FILE)  # skipped when a folder is read as personas


class PersonaFileError(ValueError):
    """A persona or A/B file that cannot be read; ``path`` and ``line`` (1-based, or None) say where."""

    def __init__(self, path: Any, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class PersonaText:
    """One calibration item: ``text`` (a statement) or ``response`` with an optional ``prompt``."""

    prompt: str | None = None
    response: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "response", "text"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"PersonaText.{name} must be a str or None, got {type(value).__name__}")
        if (self.text is None) == (self.response is None):
            raise ValueError("PersonaText needs exactly one of text= or response=")
        if self.text is not None and self.prompt is not None:
            raise ValueError("PersonaText: prompt= goes with response=, not with text=")
        body = self.text if self.text is not None else self.response
        if not body.strip():
            raise ValueError("PersonaText: the text/response is empty")

    @property
    def body(self) -> str:
        """The persona's own words: the response, or the statement."""
        return self.response if self.response is not None else self.text  # type: ignore[return-value]

    @property
    def has_prompt(self) -> bool:
        return self.prompt is not None

    def to_dict(self) -> dict[str, str]:
        """The JSON Lines form of this item."""
        fields = (("prompt", self.prompt), ("response", self.response), ("text", self.text))
        return {k: v for k, v in fields if v is not None}


#: the package's one A/B item type (``answer_matching`` is the letter the ``persona`` would pick, as "(A)")
ABQuestion = ABItem


class Rendered(NamedTuple):
    """What :func:`render` returns: the text to run and the character offset where the response starts."""

    text: str
    response_start: int


# ----------------------------------------------------------------------------------------------------------------
# reading files


def _as_source(path: PathLike) -> tuple[Any, str]:
    """(object with read_bytes/is_file, display name)."""
    if isinstance(path, (str, os.PathLike)):
        p = Path(path).expanduser()
        return p, str(p)
    if hasattr(path, "read_bytes") and hasattr(path, "is_file"):
        return path, str(path)
    raise TypeError(f"path must be a str, os.PathLike or importlib.resources Traversable, got {type(path).__name__}")


def _require_file(src: Any, name: str) -> None:
    if not src.is_file():
        if src.is_dir():
            raise IsADirectoryError(f"{name} is a folder, expected a file ({', '.join(_SUFFIXES)})")
        raise FileNotFoundError(f"file not found: {name}")


def _read_text(path: PathLike) -> tuple[str, str]:
    """Decoded UTF-8 text of ``path`` and its display name, with clear errors."""
    src, name = _as_source(path)
    _require_file(src, name)
    data = src.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
        shift = 3
    else:
        shift = 0
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PersonaFileError(
            name, f"not valid UTF-8 at byte offset {exc.start + shift} ({exc.reason}); save the file as UTF-8", line
        ) from None
    return text, name


def _suffix(name: str) -> str:
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return ""


def _item_from_obj(obj: Any, name: str, line: int | None) -> PersonaText:
    if not isinstance(obj, dict):
        raise PersonaFileError(name, f"expected a JSON object, got {type(obj).__name__}", line)

    def field(key: str) -> str:
        value = obj[key]
        if not isinstance(value, str):
            raise PersonaFileError(name, f"{key!r} must be a string, got {type(value).__name__}", line)
        value = value.strip()
        if not value:
            raise PersonaFileError(name, f"{key!r} is empty", line)
        return value

    has_text = "text" in obj
    pair = next(((p, r) for p, r in _PAIR_KEYS if p in obj and r in obj), None)
    if has_text and (pair is not None or "response" in obj or "answer" in obj):
        raise PersonaFileError(name, "an item has both 'text' and a response; use one or the other", line)
    if has_text:
        return PersonaText(text=field("text"))
    if pair is not None:
        return PersonaText(prompt=field(pair[0]), response=field(pair[1]))
    if "response" in obj and not any(p in obj for p, _ in _PAIR_KEYS):
        return PersonaText(response=field("response"))
    expected = " or ".join(["'text'"] + [f"'{p}'+'{r}'" for p, r in _PAIR_KEYS])
    raise PersonaFileError(name, f"missing keys: expected {expected}, found {sorted(obj)}", line)


def _jsonl_objects(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of JSONL ``text``; bad JSON names file and line."""
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PersonaFileError(name, f"invalid JSON ({exc.msg} at column {exc.colno})", lineno) from None
        yield lineno, obj


def _parse_jsonl(text: str, name: str) -> list[PersonaText]:
    return [_item_from_obj(obj, name, lineno) for lineno, obj in _jsonl_objects(text, name)]


def _parse_json(text: str, name: str) -> list[PersonaText]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PersonaFileError(name, f"invalid JSON ({exc.msg} at column {exc.colno})", exc.lineno) from None
    if not isinstance(data, list):
        raise PersonaFileError(name, f"a .json persona file must hold a list of objects, got {type(data).__name__}")
    return [_item_from_obj(obj, name, None) for obj in data]


def _parse_txt(text: str, name: str) -> list[PersonaText]:
    lines = [ln.rstrip() for ln in text.splitlines()]
    # strip leading/trailing blank lines: only blank lines *between* content switch to paragraph mode
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if any(not ln.strip() for ln in lines):
        chunks, current = [], []
        for ln in lines:
            if ln.strip():
                current.append(ln.strip())
            elif current:
                chunks.append("\n".join(current))
                current = []
        if current:
            chunks.append("\n".join(current))
    else:
        chunks = [ln.strip() for ln in lines]
    return [PersonaText(text=c) for c in chunks]


def load_persona_file(path: PathLike) -> list[PersonaText]:
    """Read one persona file (``.jsonl``, ``.json`` or ``.txt``; format in the module docstring).

    Raises FileNotFoundError when it does not exist and :class:`PersonaFileError` (a ValueError naming the
    file, and the line where it applies) when it is empty, not UTF-8, malformed or lacks the keys.
    """
    src, name = _as_source(path)
    _require_file(src, name)
    suffix = _suffix(getattr(src, "name", name))
    if not suffix:
        raise PersonaFileError(name, f"unsupported file type; expected one of {', '.join(_SUFFIXES)}")
    text, name = _read_text(path)
    parser = {".jsonl": _parse_jsonl, ".json": _parse_json, ".txt": _parse_txt}[suffix]
    items = parser(text, name)
    if not items:
        raise PersonaFileError(name, "the file holds no persona items (it is empty or only whitespace)")
    return items


def _coerce_items(name: str, values: Iterable[Any]) -> list[PersonaText]:
    items = []
    for i, v in enumerate(values):
        if isinstance(v, PersonaText):
            items.append(v)
        elif isinstance(v, str):
            items.append(PersonaText(text=v))
        elif isinstance(v, dict):
            items.append(_item_from_obj(v, f"<persona {name!r}>", i + 1))
        else:
            raise TypeError(f"persona {name!r} item {i}: expected PersonaText, str or dict, got {type(v).__name__}")
    if not items:
        raise ValueError(f"persona {name!r} has no items")
    return items


def load_personas(spec: Mapping[str, Any] | PathLike | None = None) -> dict[str, list[PersonaText]]:
    """Personas from ``spec``.

    ``spec`` is a dict ``{name: path}`` (a value may also be a list of PersonaText / str / dict items), or a
    folder whose ``<name>.jsonl`` / ``<name>.json`` / ``<name>.txt`` files are the personas (files starting with
    ``_`` or ``.``, ``ab_questions.jsonl`` and ``personas.json`` are skipped), or None for :func:`default_personas`.
    """
    if spec is None:
        return default_personas()
    if isinstance(spec, Mapping):
        out: dict[str, list[PersonaText]] = {}
        for name, value in spec.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"persona names must be non-empty strings, got {name!r}")
            if isinstance(value, (str, os.PathLike)) or (hasattr(value, "read_bytes") and hasattr(value, "is_file")):
                out[name] = load_persona_file(value)
            elif isinstance(value, Iterable):
                out[name] = _coerce_items(name, value)
            else:
                raise TypeError(f"spec[{name!r}] must be a path or a list of items, got {type(value).__name__}")
        if not out:
            raise ValueError("spec is an empty dict; give at least one persona")
        return out
    folder, label = _as_source(spec)
    if not folder.is_dir():
        if folder.is_file():
            raise ValueError(f"{label} is a file; load_personas expects a folder or a dict {{name: path}}")
        raise FileNotFoundError(f"persona folder not found: {label}")
    found: dict[str, Any] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        suffix = _suffix(entry.name)
        if not suffix or not entry.is_file() or entry.name[0] in "._" or entry.name in _RESERVED:
            continue
        stem = entry.name[: -len(suffix)]
        if stem in found:
            raise ValueError(f"{label}: two files for persona {stem!r} ({found[stem].name}, {entry.name})")
        found[stem] = entry
    if not found:
        raise FileNotFoundError(f"{label} holds no persona files ({', '.join('*' + s for s in _SUFFIXES)})")
    return {stem: load_persona_file(entry) for stem, entry in found.items()}


# ----------------------------------------------------------------------------------------------------------------
# bundled defaults


def _data_dir() -> Traversable:
    return resources.files("persona_kernels").joinpath("data", "personas")


@functools.lru_cache(maxsize=1)
def _metadata() -> dict[str, Any]:
    meta_file = _data_dir().joinpath(_META_FILE)
    text, name = _read_text(meta_file)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PersonaFileError(name, f"invalid JSON ({exc.msg})", exc.lineno) from None
    for key in ("pairs", "system_prompts", "descriptions"):
        if key not in meta:
            raise PersonaFileError(name, f"missing key {key!r}")
    return meta


@functools.lru_cache(maxsize=1)
def _default_items() -> dict[str, tuple[PersonaText, ...]]:
    meta = _metadata()
    files = meta.get("files") or {n: f"{n}.jsonl" for n in persona_names()}
    base = _data_dir()
    return {name: tuple(load_persona_file(base.joinpath(fname))) for name, fname in files.items()}


def persona_names() -> list[str]:
    """Names of the bundled personas, pair by pair (positive first)."""
    names: list[str] = []
    for pos, neg in default_pairs():
        names += [n for n in (pos, neg) if n not in names]
    return names


def default_personas() -> dict[str, list[PersonaText]]:
    """The bundled personas: ``{name: [PersonaText, ...]}`` (fresh lists; items are immutable)."""
    return {name: list(items) for name, items in _default_items().items()}


def default_pairs() -> list[tuple[str, str]]:
    """The bundled opposing pairs as ``(positive, negative)``, e.g. ``("power_seeking", "power_averse")``."""
    return [(p["positive"], p["negative"]) for p in _metadata()["pairs"]]


def default_pair_names() -> dict[str, tuple[str, str]]:
    """``{pair name: (positive, negative)}``, e.g. ``{"power": ("power_seeking", "power_averse"), ...}``."""
    return {p["name"]: (p["positive"], p["negative"]) for p in _metadata()["pairs"]}


def _lookup(table: str, persona: str) -> str:
    values = _metadata()[table]
    if persona not in values:
        raise KeyError(f"unknown persona {persona!r}; bundled personas: {', '.join(sorted(values))}")
    return values[persona]


def system_prompt(persona: str) -> str:
    """The one-paragraph system prompt of a bundled persona (for the prompting baseline)."""
    return _lookup("system_prompts", persona)


def description(persona: str) -> str:
    """A one-line description of a bundled persona."""
    return _lookup("descriptions", persona)


def load_ab_questions(path: PathLike | None = None, pair: str | None = None) -> list[ABQuestion]:
    """A/B demo questions (bundled ones when ``path`` is None), optionally only those of ``pair``.

    Each JSON line holds ``pair, question, answer_matching, answer_not_matching, persona``; answers are
    ``"(A)"`` or ``"(B)"`` (surrounding spaces are stripped) and must differ.
    """
    text, name = _read_text(_data_dir().joinpath(_AB_FILE) if path is None else path)
    keys = ("pair", "question", "answer_matching", "answer_not_matching", "persona")
    out = []
    for lineno, obj in _jsonl_objects(text, name):
        if not isinstance(obj, dict):
            raise PersonaFileError(name, f"expected a JSON object, got {type(obj).__name__}", lineno)
        missing = [k for k in keys if k not in obj]
        if missing:
            raise PersonaFileError(name, f"missing keys {missing}; expected {list(keys)}", lineno)
        vals = {k: obj[k].strip() if isinstance(obj[k], str) else obj[k] for k in keys}
        for k in keys:
            if not isinstance(vals[k], str) or not vals[k]:
                raise PersonaFileError(name, f"{k!r} must be a non-empty string", lineno)
        if {vals["answer_matching"], vals["answer_not_matching"]} != {"(A)", "(B)"}:
            raise PersonaFileError(name, "answer_matching / answer_not_matching must be '(A)' and '(B)'", lineno)
        if pair is None or vals["pair"] == pair:
            out.append(ABItem(vals["question"], vals["answer_matching"][1], f"{name}:{lineno}", vals["pair"], vals["persona"]))
    if not out:
        raise PersonaFileError(name, "no A/B questions" + (f" for pair {pair!r}" if pair else ""))
    return out


# ----------------------------------------------------------------------------------------------------------------
# rendering


def _has_chat_template(tokenizer: Any) -> bool:
    if getattr(tokenizer, "chat_template", None):
        return True
    try:
        return bool(tokenizer.get_chat_template())
    except Exception:
        return False


def _apply(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(out, str):
        raise TypeError(f"tokenizer.apply_chat_template(tokenize=False) returned {type(out).__name__}, expected str")
    return out


def render(
    item: PersonaText | str,
    tokenizer: Any = None,
    chat_template: bool = False,
    system_prompt: str | None = None,
) -> Rendered:
    """The text to run through the model for ``item`` and the character offset where its response starts.

    Without a chat template: ``[system_prompt + SEP] + [prompt + SEP] + response`` with ``SEP = "\\n\\n"``;
    a statement (``text``) is its own response. With ``chat_template=True`` and a tokenizer that has a
    template, ``tokenizer.apply_chat_template`` renders ``[system], user=prompt, assistant=response`` (a statement
    becomes an assistant message with no user turn, or plain text with a warning if the template refuses that)
    and the response is located in the rendered string. A tokenizer without a template falls back to the plain
    form with a warning. ``text[response_start:]`` starts with the response; template text after it (end-of-turn
    markers) is not part of the response, so a caller that marks response tokens should use the character span
    ``[response_start, response_start + len(item.body))`` against the tokenizer's offset mapping. Templated
    text already holds the special tokens: tokenize it with ``add_special_tokens=False``.
    """
    if isinstance(item, str):
        item = PersonaText(text=item)
    elif not isinstance(item, PersonaText):
        raise TypeError(f"item must be a PersonaText or str, got {type(item).__name__}")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError(f"system_prompt must be a str or None, got {type(system_prompt).__name__}")
    body = item.body

    if chat_template:
        if tokenizer is None:
            raise ValueError("render(chat_template=True) needs tokenizer=")
        if _has_chat_template(tokenizer):
            return _render_chat(item, body, tokenizer, system_prompt)
        warnings.warn(
            f"{type(tokenizer).__name__} has no chat template; rendering persona texts as plain text",
            stacklevel=2,
        )
    head = [s for s in (system_prompt, item.prompt) if s]
    prefix = "".join(s + PLAIN_SEPARATOR for s in head)
    return Rendered(prefix + body, len(prefix))


def _render_chat(item: PersonaText, body: str, tokenizer: Any, system: str | None) -> Rendered:
    messages = [{"role": "system", "content": system}] if system else []
    if item.prompt is not None:
        messages.append({"role": "user", "content": item.prompt})
    try:
        full = _apply(tokenizer, messages + [{"role": "assistant", "content": body}], add_generation_prompt=False)
    except Exception as exc:
        if item.prompt is not None:
            raise
        # templates that insist on a user turn first: a statement is then rendered as plain text
        warnings.warn(
            f"chat template refused a statement without user turn ({exc}); rendering it as plain text", stacklevel=3
        )
        prefix = system + PLAIN_SEPARATOR if system else ""
        return Rendered(prefix + body, len(prefix))
    # Preferred: the rendering up to the generation prompt is a prefix of the full text and the response
    # follows it. Otherwise (templates that rewrite earlier turns) take the last occurrence of the response.
    start = -1
    try:
        prefix = _apply(tokenizer, messages, add_generation_prompt=True) if messages else ""
    except Exception:  # some templates refuse a conversation without a user turn
        prefix = ""
    if prefix and full.startswith(prefix):
        start = full.find(body, len(prefix))
    if start < 0:
        start = full.rfind(body)
    if start < 0:
        raise ValueError(
            "the chat template changed the response text, so its position cannot be found "
            f"(response {body[:40]!r}...); use chat_template=False for this tokenizer"
        )
    return Rendered(full, start)
