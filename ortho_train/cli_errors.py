"""A failed `train.py` ends with one line a person can act on: `error: <setting>: <message>`.

jsonargparse wraps an error raised while it builds the classes (a module's `__init__`, a config
dataclass's `__post_init__`) in one "Does not validate against any of the Union subtypes" error
per level, each ending with a dump of the whole `Namespace`; the toolkit's own sentence sits
under them, tens of lines up. `run_reporting_errors` follows the exception's cause chain past
jsonargparse's wrappers to that error and prints it last. A type error found while parsing (`--model.lr=abc`)
carries the setting only in the wrappers ('Parser key "model"', 'Parser key "lr"'): those keys
are joined in front of the innermost message. A value outside a closed choice (a `Literal[...]`
in a signature) reads as the toolkit's own checks write it: `data.forget_target='bogus': must be
one of 'secret', 'secret_suffix', 'full'`.

With `ORTHO_TRAIN_TRACEBACK=1` nothing is caught: the full traceback, as Python prints it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Callable, Iterator

from ortho_train.artifacts import DiskSpaceError
from ortho_train.settings import SettingError, show

TRACEBACK_ENV = "ORTHO_TRAIN_TRACEBACK"
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH_PROBLEM = re.compile(r"Problem with given class_path '([^']*)'")
_SUBTYPES = re.compile(r"Subtypes: \[([^\n]*)\]")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", re.S)  # jsonargparse's words
# Where a class jsonargparse builds sits in a config, by the base class its Union names; an
# error of a nested config (`table.alphas=[]`) is shown under it: `trainer.callbacks: table.alphas=[]: …`.
_SECTIONS = (("Callback", "trainer.callbacks"), ("LightningModule", "model.init_args"),
             ("LightningDataModule", "data"))
_NAMED = ("model.", "data.", "trainer.", "ckpt_path", "seed_everything")  # messages that already name their section
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
        elif (problem := _CLASS_PATH_PROBLEM.match(head)) and keys and not _is_dataclass(problem.group(1)):
            keys.append("init_args")  # a config dataclass takes its fields directly, a class under init_args
    return keys


def _is_dataclass(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    return dataclasses.is_dataclass(getattr(sys.modules.get(module), name, None))


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _LONGEST else text[: _LONGEST - 1] + "…"


def _raised_by_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("jsonargparse")


def toolkit_error(err: BaseException) -> BaseException:
    """The error behind jsonargparse's wrappers: the first in the cause chain raised elsewhere.
    A toolkit error raised `from` a library's (CorpusError from UnicodeDecodeError) is kept."""
    chain = list(cause_chain(err))
    return next((link for link in chain if not _raised_by_jsonargparse(link)), chain[-1])


def failure_line(err: BaseException) -> str:
    """The toolkit's message behind `err`, naming the setting where the error does."""
    chain = list(cause_chain(err))
    found = toolkit_error(err)
    message = str(found) or type(found).__name__
    if not isinstance(found, (ValueError, OSError)):
        message = f"{type(found).__name__}: {message}"  # e.g. ZeroDivisionError: a bug, not a setting
    keys = _setting_keys(chain)
    literal = _LITERAL.fullmatch(message.strip())
    if keys and literal:
        message = f"{'.'.join(keys)}={show(literal.group(2))}: must be one of {literal.group(1)}"
    elif keys and not isinstance(found, SettingError):
        message = f"{'.'.join(keys)}: {message}"
    elif not message.startswith(_NAMED) and (section := _section(chain)):
        message = f"{section}: {message}"
    return one_line(message)


def exit_status(err: BaseException) -> int:
    """2 for a refused setting or file (as a usage error), 1 for any other failure (a full disk
    included: nothing the user wrote is wrong)."""
    found = toolkit_error(err)
    return 2 if isinstance(found, _INPUT_ERRORS) and not isinstance(found, DiskSpaceError) else 1


def _section(chain: list[BaseException]) -> str | None:
    """The config section of the class whose building failed, from jsonargparse's outermost
    "Subtypes: [...]" (None: not raised while jsonargparse built a class)."""
    for link in chain:
        found = _SUBTYPES.search(str(link))
        if found:
            return next((section for base, section in _SECTIONS if f".{base}'>" in found.group(1)
                         or f".{base}]" in found.group(1)), None)
    return None


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
