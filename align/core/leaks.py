"""Keep secrets out of what align writes, exports and pushes.

Two kinds of secret are looked for:

- **The current environment's**: the value of every secret-looking variable (`*TOKEN*`, `*KEY*`,
  `*SECRET*`, `*PASSWORD*`), and of every credential a recipe handed to this process (`hub_token`, held in
  memory only). Sandboxed runs never see our environment, but a secret can still reach the data another way
  (a server's reply, a problem file, a prompt someone pasted): before anything is written as an export or
  pushed to the Hub, it is searched for those values.
- **Credential patterns**, whoever's they are: a key whose name says it holds a credential (see
  `secret_key`), a value that looks like one (a Hub `hf_...` token, an `sk-...` API key, GitHub / AWS / Slack
  tokens, the password in `scheme://user:password@host`). Configs align writes have them masked (`mask`,
  `mask_text`), and a model folder about to be pushed is refused if a file holds one (`check_folder` with
  `patterns=True`; text, JSON / YAML, pickles such as `training_args.bin`, safetensors headers).

A hit is one line naming the file and what was found (never the value). docs/secrets.md is the user's page.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

from align.core.errors import AlignError

from align.core.redact import (  # noqa: F401  (re-exported: align.core.leaks is where callers look)
    SECRET_NAME,
    MIN_SECRET_LENGTH,
    MASK,
    SECRET_WORDS,
    TOKENIZER_ROLES,
    _WORDS,
    secret_key,
    _BEFORE,
    TOKEN_PATTERNS,
    _TOKEN_RES,
    _TOKENS,
    _URL_PASSWORD,
    _URL_AT,
    URL_PASSWORD,
    _KEY_WORDS,
    _KEY_CHARS,
    _AFTER_KEY,
    _EMPTY,
    credential_in,
    mask_text,
    _meaningful,
    mask,
    mask_argv,
)


# ------------------------------------------------------------------ secrets held in memory only
_HELD: dict[tuple[int, str], str] = {}  # (id of the arguments object it came with, key) -> value
# The pipeline writes its stages' recipes masked and hands their secrets to the stage's own processes in this
# variable (never in a file): {recipe file (absolute): [[path, masked, original], ...]}.
RECIPE_SECRETS_ENV = "ALIGN_RECIPE_SECRETS"


def hold(owner, name: str, value: str | None) -> None:
    """Keep a credential a recipe gave (hub_token) in this process's memory, with the arguments object
    `owner` it came with: what `held(owner, name)` returns, and a value every export and push is checked
    for. None forgets it."""
    if value is None:
        _HELD.pop((id(owner), name), None)
    else:
        _HELD[(id(owner), name)] = value


def held(owner, name: str) -> str | None:
    return _HELD.get((id(owner), name))


def recipe_secrets_env(files: dict[str, list]) -> dict[str, str]:
    """The environment entry that hands `files`' masked secrets to a child process ({} when none)."""
    files = {str(Path(f).resolve()): found for f, found in files.items() if found}
    return {RECIPE_SECRETS_ENV: json.dumps(files)} if files else {}


def _handed_secrets(environ) -> dict[str, list]:
    try:
        files = json.loads(environ.get(RECIPE_SECRETS_ENV) or "{}")
        return files if isinstance(files, dict) else {}
    except ValueError:
        return {}


def restore(path: str | os.PathLike, data: Any, environ=None) -> Any:
    """A recipe read from `path` with the secrets the pipeline handed this process put back (where the
    file still holds their masked form)."""
    found = _handed_secrets(os.environ if environ is None else environ).get(str(Path(path).resolve()))
    for keys, masked, original in found or []:
        parent, ok = data, True
        for key in keys[:-1]:
            try:
                parent = parent[key]
            except (KeyError, IndexError, TypeError):
                ok = False
                break
        if ok and keys:
            try:
                if parent[keys[-1]] == masked:
                    parent[keys[-1]] = original
            except (KeyError, IndexError, TypeError):
                pass
        elif ok and data == masked:
            data = original
    return data


def secret_values(environ=None) -> dict[str, str]:
    """Values to search exports and pushes for, by what to call them: secret-looking variables ($NAME), the
    credentials held in memory, and those the pipeline handed this process."""
    environ = os.environ if environ is None else environ
    out = {f"${name}": value for name, value in environ.items()
           if SECRET_NAME.search(name) and name != RECIPE_SECRETS_ENV and len(value.strip()) >= MIN_SECRET_LENGTH}
    if environ is os.environ:
        out.update({f"the {name} given to this stage": v for (_, name), v in _HELD.items() if len(v.strip()) >= MIN_SECRET_LENGTH})
    for file, found in _handed_secrets(environ).items():
        for keys, _, original in found:
            for value in _strings(original):
                if len(value.strip()) >= MIN_SECRET_LENGTH:
                    out[f"the {'.'.join(map(str, keys))} of {file}"] = value
    return out


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif value is not None and not isinstance(value, bool):
        yield str(value)


def find_secret(text: str, secrets: dict[str, str]) -> str | None:
    """The name of the first secret whose value occurs in `text`."""
    for name, value in secrets.items():
        if value in text:
            return name
    return None


def check_rows(rows, where: str, secrets: dict[str, str] | None = None) -> None:
    """Rows (dicts of strings, lists, numbers) about to be exported."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return
    for i, row in enumerate(rows):
        name = find_secret(json.dumps(row, ensure_ascii=False, default=str), secrets)
        if name:
            raise AlignError(f"{where}: row {i} contains the value of {name}; refusing to write it "
                             "(remove the secret from the data, or unset the variable if it is not one)")


# ------------------------------------------------------------------ scanning files for patterns
TEXT_SUFFIXES = frozenset({".yaml", ".yml", ".json", ".jsonl", ".toml", ".cfg", ".ini", ".env", ".md", ".txt"})
_PATTERN_SCAN_LIMIT = 1 << 26  # a pickle or a zip member: its first 64 MiB are read


class _Stub:
    """Whatever a pickle names (a class, a function) stands in as this, so a pickle is read without
    importing or running anything: it only records the arguments and state it was given."""

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.state, self.items = args, None, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub(self, *args)

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append((None, value))

    def extend(self, values):
        self.items.extend((None, v) for v in values)


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _Stub

    def persistent_load(self, pid):  # torch.save's tensor storages
        return None


def _pickled_pairs(data: bytes):
    """(key, value) pairs of the mappings and objects' state in a pickle, read with stubs (nothing runs)."""
    import io

    try:
        root = _StubUnpickler(io.BytesIO(data)).load()
    except Exception:  # not a pickle after all, or one that needs more than stubs: its bytes are still searched
        return
    stack, seen = [root], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _Stub):
            stack += [obj.state, *obj.args] + [v for _, v in obj.items]
            yield from ((k, v) for k, v in obj.items if isinstance(k, str))
        elif isinstance(obj, dict):
            yield from ((k, v) for k, v in obj.items() if isinstance(k, str))
            stack += list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif isinstance(obj, str):
            yield None, obj


def _credential_in_pairs(pairs) -> str | None:
    for key, value in pairs:
        if key is not None and secret_key(key) and _meaningful(value) and len(str(value).strip()) >= MIN_SECRET_LENGTH:
            return f"key '{key}' with a value"
        if isinstance(value, str):
            found = credential_in(value)
            if found:
                return found
    return None


def _credential_in_text(text: str) -> str | None:
    found = credential_in(text)
    if found:
        return found
    low = text.lower()
    for word in _KEY_WORDS:
        at = low.find(word)
        while at != -1:
            start, end = at, at + len(word)
            while start > 0 and text[start - 1] in _KEY_CHARS:
                start -= 1
            after = _AFTER_KEY.match(text, end)
            if after:
                key = text[start:end + (1 if text[end:end + 1] in "sS" and after.group(0)[:1] in "sS" else 0)]
                value = after.group("value")
                if secret_key(key) and len(value) >= MIN_SECRET_LENGTH and _meaningful(value):
                    return f"key '{key.lstrip('.-0123456789')}' with a value"
            at = low.find(word, end)
    return None


def credential_in_file(path: str | os.PathLike) -> str | None:
    """What credential-looking content a file holds (one of the descriptions above), or None. Text and
    config files: values and secret keys with a value; pickles (`training_args.bin`, torch.save's zip of
    pickles too): read with stubs, keys and values; safetensors: the JSON header (not the tensor bytes,
    where a random match would only mislead); anything else: its bytes."""
    import zipfile

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_PATTERN_SCAN_LIMIT)
    if path.suffix == ".safetensors" and len(head) >= 8:
        size = int.from_bytes(head[:8], "little")
        return _credential_in_text(head[8:8 + size].decode("utf-8", "replace"))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return _credential_in_pairs(_table_pairs(pq.read_table(path).to_pylist()))
    if head.startswith(b"PK\x03\x04"):  # a zip (torch.save's format): each member
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    with archive.open(info) as member:
                        data = member.read(_PATTERN_SCAN_LIMIT)
                    found = (_credential_in_pairs(_pickled_pairs(data)) if info.filename.endswith(".pkl") else None) \
                        or credential_in(data.decode("latin-1"))
                    if found:
                        return found
            return None
        except zipfile.BadZipFile:
            pass
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # a pickle
        found = _credential_in_pairs(_pickled_pairs(head))
        if found:
            return found
    as_text = path.suffix.lower() in TEXT_SUFFIXES or path.name.startswith("README")
    for chunk in _chunks(path, 4096):  # (a credential spanning two chunks is found too)
        found = _credential_in_text(chunk.decode("utf-8", "replace")) if as_text else credential_in(chunk.decode("latin-1"))
        if found:
            return found
    return None


def _table_pairs(rows):
    for row in rows:
        for key, value in (row.items() if isinstance(row, dict) else []):
            for text in _strings(value):
                yield key, text


def check_folder(folder: str | os.PathLike, secrets: dict[str, str] | None = None, ignore=(),
                 patterns: bool = False) -> None:
    """Every file of a folder about to be pushed (but those matching `ignore`): searched for the values of
    `secrets` (default: secret_values()), parquet decoded, everything else read in chunks (a secret spanning
    two chunks is found too); with `patterns`, also for credentials of any kind (`credential_in_file`)."""
    import fnmatch

    secrets = secret_values() if secrets is None else secrets
    if not secrets and not patterns:
        return
    needles = {name: value.encode() for name, value in secrets.items()}
    overlap = max((len(n) for n in needles.values()), default=0)
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if any(fnmatch.fnmatch(relative, pattern) for pattern in ignore):
            continue
        if needles:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                chunks = [str(pq.read_table(path).to_pylist()).encode("utf-8", "replace")]
            else:
                chunks = _chunks(path, overlap)
            for chunk in chunks:
                for name, needle in needles.items():
                    if needle in chunk:
                        raise AlignError(f"{path}: contains the value of {name}; refusing to push it "
                                         "(remove the secret from the data, or unset the variable if it is not one)")
        if patterns:
            found = credential_in_file(path)
            if found:
                raise AlignError(f"{path}: holds what looks like a credential ({found}); refusing to push it "
                                 "(remove it; give tokens through HF_TOKEN or `hf auth login`, see docs/secrets.md)")


def _chunks(path: Path, overlap: int, size: int = 1 << 24):
    with open(path, "rb") as f:
        tail = b""
        while True:
            block = f.read(size)
            if not block:
                return
            yield tail + block
            tail = block[-overlap:] if overlap else b""
