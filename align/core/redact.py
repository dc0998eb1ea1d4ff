"""Credential patterns and masking, with no other align import: what `align.core.errors` (the one-line errors),
`align.core.leaks` (the checks before an export or a push) and the config writers share. See align/core/leaks.py for
what is looked for and why; docs/secrets.md is the user's page."""

from __future__ import annotations

import re
from typing import Any

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD", re.I)
MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") are not secrets and would match everywhere
MASK = "<masked>"  # what a masked value reads as in a saved file

# ------------------------------------------------------------------ which keys hold credentials
# A key holds a credential when its LAST word is one of these (words: split at _ - . and camelCase), so
# hub_token, token, api_key, WANDB_API_KEY, client_secret, db_password do, while max_new_tokens, keys,
# api_key_env (it names a variable), hub_model_id, tokenizer_name or pad_token_id do not.
SECRET_WORDS = frozenset({"token", "key", "apikey", "secret", "password", "passwd", "credential", "credentials"})
# ... except a tokenizer's special tokens (TRL's pad_token / eos_token, a tokenizer_config's bos_token):
TOKENIZER_ROLES = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask"})
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def secret_key(name) -> bool:
    """Whether a config key (or variable) of this name holds a credential."""
    words = [w.lower() for w in _WORDS.findall(str(name))]
    if not words or words[-1] not in SECRET_WORDS:
        return False
    return not (words[-1] == "token" and len(words) > 1 and words[-2] in TOKENIZER_ROLES)


# ------------------------------------------------------------------ which values are credentials
_BEFORE = r"(?<![A-Za-z0-9_])"
# label -> (literal starts, pattern): the literals are looked for first (fast), the pattern only where one is
TOKEN_PATTERNS = {
    "a Hugging Face token (hf_...)": (("hf_", "api_org_"), rf"{_BEFORE}(?:hf_|api_org_)[A-Za-z0-9]{{20,}}"),
    "an API key (sk-...)": (("sk-",), rf"{_BEFORE}sk-(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{{20,}}"),
    "a GitHub token": (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
                       rf"{_BEFORE}(?:gh[pousr]_[A-Za-z0-9]{{30,}}|github_pat_[A-Za-z0-9_]{{30,}})"),
    "an AWS access key": (("AKIA", "ASIA"), rf"{_BEFORE}(?:AKIA|ASIA)[0-9A-Z]{{16}}(?![0-9A-Z])"),
    "a Slack token": (("xox",), rf"{_BEFORE}xox[abprs]-[A-Za-z0-9-]{{10,}}"),
}
_TOKEN_RES = {label: (starts, re.compile(pattern)) for label, (starts, pattern) in TOKEN_PATTERNS.items()}
_TOKENS = re.compile("|".join(f"(?:{pattern})" for _, pattern in TOKEN_PATTERNS.values()))
# scheme://user:password@ : the password is the secret (the rest of the URL stays readable)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@\"'<>]*:)(?P<password>[^\s/@\"'<>]+)(?=@)")
_URL_AT = re.compile(r"://[^\s/:@\"'<>]*:[^\s/@\"'<>]+@")  # (a masked password, <masked>, does not match)
URL_PASSWORD = "a password in a URL (user:password@)"
# key: value / key=value / "key": "value" in a text file, for keys secret_key accepts: found from the words
_KEY_WORDS = ("token", "key", "secret", "passwd", "password", "credential")
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_AFTER_KEY = re.compile(r"s?[\"']?[ \t]*[:=][ \t]*[\"']?(?P<value>[^\s\"',}\]#]+)")
_EMPTY = frozenset({"null", "none", "~", "true", "false", "''", '""', MASK})


def credential_in(text: str) -> str | None:
    """What credential-looking value `text` holds ("a Hugging Face token (hf_...)", ...), or None."""
    for label, (starts, pattern) in _TOKEN_RES.items():
        if any(start in text for start in starts) and pattern.search(text):
            return label
    at = text.find("://")
    while at != -1:
        if _URL_AT.match(text, at):
            return URL_PASSWORD
        at = text.find("://", at + 3)
    return None


def mask_text(text: str) -> str:
    """`text` with every credential-looking value replaced by MASK (URLs keep all but their password)."""
    text = _TOKENS.sub(MASK, text)
    return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


def _meaningful(value) -> bool:
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, str) and value.strip() not in ("", MASK) and value.strip().lower() not in _EMPTY


def mask(obj: Any, _path: tuple = (), _found: list | None = None) -> tuple[Any, list]:
    """A copy of a config (mappings, lists, scalars) with its credentials masked: the value of every key
    that `secret_key` accepts (a mapping or list under it too), and credential-looking values anywhere.
    Returns (masked copy, [[path, masked, original], ...]) so that a reader the secrets are handed to in
    memory can restore them (`restore`)."""
    found = [] if _found is None else _found
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if secret_key(key) and (_meaningful(value) or isinstance(value, (list, dict)) and value):
                found.append([list(_path + (key,)), MASK, value])
                out[key] = MASK
            else:
                out[key] = mask(value, _path + (key,), found)[0]
        return out, found
    if isinstance(obj, (list, tuple)):
        return [mask(v, _path + (i,), found)[0] for i, v in enumerate(obj)], found
    if isinstance(obj, str) and credential_in(obj):
        masked = mask_text(obj)
        found.append([list(_path), masked, obj])
        return masked, found
    return obj, found


def mask_argv(argv: list[str]) -> list[str]:
    """A command line as it may be shown or logged: the value after a `--secret_key` masked (and
    `--secret_key=value`), credential-looking values masked anywhere."""
    out, hide = [], False
    for arg in argv:
        if hide and not arg.startswith("--"):
            out.append(MASK)
            continue
        hide = False
        if arg.startswith("--"):
            name, eq, _ = arg[2:].partition("=")
            if secret_key(name.replace("-", "_")):
                if eq:
                    arg = f"--{name}={MASK}"
                else:
                    hide = True
        out.append(mask_text(arg))
    return out
