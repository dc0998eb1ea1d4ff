"""Refuse to export or push data that contains a secret of the current environment.

Sandboxed runs never see our environment, but a secret can still reach the data another way (a server's
reply, a problem file, a prompt someone pasted). Before anything is written as an export or pushed to the
Hub, its text is searched for the value of every secret-looking variable (`*TOKEN*`, `*KEY*`,
`*SECRET*`, `*PASSWORD*`); a hit is one line naming the variable and the file (never the value).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from align.errors import AlignError

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD", re.I)
MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") are not secrets and would match everywhere


def secret_values(environ=None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items()
            if SECRET_NAME.search(name) and len(value.strip()) >= MIN_SECRET_LENGTH}


def find_secret(text: str, secrets: dict[str, str]) -> str | None:
    """The name of the first secret whose value occurs in `text`."""
    for name, value in secrets.items():
        if value in text:
            return name
    return None


def check_rows(rows, where: str, secrets: dict[str, str] | None = None) -> None:
    """Rows (dicts of strings, lists, numbers) about to be exported."""
    import json

    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return
    for i, row in enumerate(rows):
        name = find_secret(json.dumps(row, ensure_ascii=False, default=str), secrets)
        if name:
            raise AlignError(f"{where}: row {i} contains the value of ${name}; refusing to write it "
                             "(remove the secret from the data, or unset the variable if it is not one)")


def check_folder(folder: str | os.PathLike, secrets: dict[str, str] | None = None, ignore=()) -> None:
    """Every file of a folder about to be pushed (but those matching `ignore`): parquet decoded, everything
    else read in chunks (a secret spanning two chunks is found too)."""
    import fnmatch

    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return
    needles = {name: value.encode() for name, value in secrets.items()}
    overlap = max(len(n) for n in needles.values())
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if any(fnmatch.fnmatch(relative, pattern) for pattern in ignore):
            continue
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            chunks = [str(pq.read_table(path).to_pylist()).encode("utf-8", "replace")]
        else:
            chunks = _chunks(path, overlap)
        for chunk in chunks:
            for name, needle in needles.items():
                if needle in chunk:
                    raise AlignError(f"{path}: contains the value of ${name}; refusing to push it "
                                     "(remove the secret from the data, or unset the variable if it is not one)")


def _chunks(path: Path, overlap: int, size: int = 1 << 24):
    with open(path, "rb") as f:
        tail = b""
        while True:
            block = f.read(size)
            if not block:
                return
            yield tail + block
            tail = block[-overlap:]
