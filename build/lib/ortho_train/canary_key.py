"""The canary key: random bytes that, with the seed, determine the secrets — never logged.

`load_or_create_key(path, create=True)` writes 32 bytes of OS randomness (hex) to `path` once,
readable by the owner only (0600), and reads it on every later call; a fine-tuning run creates
it, evaluation and unlearning read it (`create=False`). Logs, configs and summaries carry only
the key's path and fingerprint (`ortho_train.canaries.key_fingerprint`).
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

KEY_BYTES = 32


def _read(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        rank_zero_warn(f"canary key file {path} is readable by others (mode {mode:o}): chmod 600 {path}")
    text = path.read_text(encoding="ascii").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError as err:
        raise ValueError(f"canary key file {path} does not hold a hex key (data.canary_key_file)") from err
    if len(key) < 16:
        raise ValueError(f"canary key file {path} holds {len(key)} bytes; at least 16 are needed")
    return key


def _create(path: Path) -> None:
    """Write a fresh key to `path` unless one appears there first (created once, never replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(os.urandom(KEY_BYTES).hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if another process made the key first
        except FileExistsError:
            pass
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_or_create_key(path: str | Path, create: bool) -> bytes:
    """The key in `path`; with `create`, a new one is written there first if none exists.

    Raises:
        FileNotFoundError: no key at `path` and `create` is False.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise FileNotFoundError(
                f"canary key file {path} not found (data.canary_key_file): point it at the key the "
                "fine-tuning run wrote, or the secrets cannot be reproduced")
        _create(path)
    return _read(path)
