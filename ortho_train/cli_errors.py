"""A failed `train.py` ends with one line a person can act on: `error: <setting>: <message>`.

jsonargparse wraps an error raised while it builds the classes (a module's `__init__`, a config
dataclass's `__post_init__`) in one "Does not validate against any of the Union subtypes" error
per level, each ending with a dump of the whole `Namespace`; the toolkit's own sentence sits
under them, tens of lines up. `run_reporting_errors` follows the exception's cause chain to
that innermost error and prints it last. A type error found while parsing (`--model.lr=abc`)
carries the setting only in the wrappers ('Parser key "model"', 'Parser key "lr"'): those keys
are joined in front of the innermost message.

With `ORTHO_TRAIN_TRACEBACK=1` nothing is caught: the full traceback, as Python prints it.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, Iterator

from ortho_train.settings import SettingError

TRACEBACK_ENV = "ORTHO_TRAIN_TRACEBACK"
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH_PROBLEM = "Problem with given class_path"
# Errors of what the user gave (settings, files): exit status 2, as argparse's usage errors.
_INPUT_ERRORS = (ValueError, TypeError, OSError)
_LONGEST = 600  # characters of the last line: a message that long is a dump, not a sentence


def cause_chain(err: BaseException) -> Iterator[BaseException]:
    """`err`, then what it was raised from (or during), outermost first."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)


def _setting_keys(chain: list[BaseException]) -> list[str]:
    """The dotted setting jsonargparse's wrappers name ('Parser key "model"' … 'Parser key "lr"'
    → model.init_args.lr)."""
    keys: list[str] = []
    for link in chain:
        head = str(link).lstrip().split("\n", 1)[0]
        found = _PARSER_KEY.match(head)
        if found and (not keys or keys[-1] != found.group(1)):
            keys.append(found.group(1))
        elif head.startswith(_CLASS_PATH_PROBLEM) and keys:
            keys.append("init_args")
    return keys


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _LONGEST else text[: _LONGEST - 1] + "…"


def failure_line(err: BaseException) -> str:
    """The toolkit's message behind `err`, naming the setting where the error does."""
    chain = list(cause_chain(err))
    innermost = chain[-1]
    message = str(innermost) or type(innermost).__name__
    if not isinstance(innermost, (SettingError, ValueError, OSError)):
        message = f"{type(innermost).__name__}: {message}"  # e.g. ZeroDivisionError: a bug, not a setting
    keys = _setting_keys(chain)
    if keys and not isinstance(innermost, SettingError):
        message = f"{'.'.join(keys)}: {message}"
    return one_line(message)


def exit_status(err: BaseException) -> int:
    """2 for a refused setting or file (as a usage error), 1 for any other failure."""
    return 2 if isinstance(list(cause_chain(err))[-1], _INPUT_ERRORS) else 1


def run_reporting_errors(main: Callable[[], object]) -> int:
    """Run `main`; on an exception print its toolkit message as the last line of stderr and
    return the exit status (0: success). `ORTHO_TRAIN_TRACEBACK=1`: let the exception through."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        main()
        return 0
    try:
        main()
    except Exception as err:  # KeyboardInterrupt and SystemExit (--help, --print_config) pass through
        print(f"(the full traceback: {TRACEBACK_ENV}=1)", file=sys.stderr)
        print(f"error: {failure_line(err)}", file=sys.stderr, flush=True)
        return exit_status(err)
    return 0
