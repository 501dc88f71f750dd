"""`Registry[T]`: one shape for every name → entry table of the toolkit (losses, formats, supports, …).

    LOSSES = Registry("unlearning loss", setting="model.init_args.loss")

    @FORGET_TERMS.register("npo")               # a class or function, registered where it is defined
    class NegativePreference(LossTerm): ...

    FORMATS.add("nf4", BnB4("nf4"))            # an instance, registered by one line
    SUPPORTS.register("impact", sees="…")       # metadata per entry (`meta`), declared by the registry

    LOSSES.get("npo_gdr")  # the entry; an unknown name raises a `SettingError` (a ValueError)
    # SettingError: model.init_args.loss='npo_grd': must be one of 'ga', 'gdr', 'klr', 'npo', …

A newcomer adds an entry with one new file (the class or function) and one registry line (the
decorator or `add`); every config check, `--help` list and error message reads the names from
here. A second entry under a taken name is refused. `reg[name] = value` and `del reg[name]` are
`add` and `unregister` (so `monkeypatch.setitem` registers an entry for one test).

Closed choices that a config parser must list (`typing.Literal`) name a registry's entries once
more; such a registry takes the `literal=` it must match, and a test checks that every registry
with a Literal has exactly its Literal's names (`tests/test_registries.py`).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")
REQUIRED = object()  # a `meta` default: the key must be given at registration
_MISSING = object()


class Registry(Generic[T]):
    """Named entries of one kind, in registration order.

    Args:
        kind: what an entry is, for messages ("unlearning loss").
        setting: where a config chooses an entry (`model.init_args.loss`), named by `get`'s errors.
        meta: the metadata keys an entry may carry, with their defaults (`REQUIRED`: no default).
        name_attribute: set this attribute of a registered class/object to its name (None: don't).
        literal: the `Literal[...]` type a config signature uses for this registry's names.
    """

    _instances: "weakref.WeakSet[Registry]" = weakref.WeakSet()

    def __init__(self, kind: str, setting: str = "", meta: dict[str, Any] | None = None,
                 name_attribute: str | None = None, literal: Any = None):
        self.kind, self.setting, self.literal = kind, setting, literal
        self.meta_defaults = dict(meta or {})
        self.name_attribute = name_attribute
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        Registry._instances.add(self)

    # ---------------------------------------------------------------- adding
    def add(self, name: str, entry: T, **meta: Any) -> T:
        """Register `entry` as `name` with its metadata; returns `entry`."""
        if name in self._entries:
            raise ValueError(f"a {self.kind} named {name!r} is registered already")
        unknown = sorted(set(meta) - set(self.meta_defaults))
        if unknown:
            raise TypeError(f"{self.kind} {name!r}: unknown registry metadata {unknown}; "
                            f"known: {sorted(self.meta_defaults)}")
        full = self.meta_defaults | meta
        missing = sorted(key for key, value in full.items() if value is REQUIRED)
        if missing:
            raise TypeError(f"{self.kind} {name!r}: registry metadata {missing} must be given")
        if self.name_attribute is not None:
            setattr(entry, self.name_attribute, name)
        self._entries[name], self._meta[name] = entry, full
        return entry

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator form of `add`: `@REG.register("name", key=value)` above a class or function."""
        return lambda entry: self.add(name, entry, **meta)

    def unregister(self, name: str) -> T:
        """Remove `name` (tests that register an entry for themselves); returns its entry."""
        self._meta.pop(name, None)
        return self._entries.pop(name)

    # --------------------------------------------------------------- looking up
    def get(self, name: str, default: Any = _MISSING, *, setting: str | None = None) -> T:
        """The entry `name`. Unknown: `default` when one is given, else a `SettingError` naming the
        setting (`setting`, or the registry's own) and every registered name."""
        if name in self._entries:
            return self._entries[name]
        if default is not _MISSING:
            return default
        from ortho_train.settings import SettingError, show  # settings imports nothing of ours

        where = setting if setting is not None else self.setting
        choices = ", ".join(show(n) for n in self._entries)
        head = f"{where}={show(name)}" if where else f"{self.kind} {show(name)}"
        raise SettingError(f"{head}: must be one of {choices} (a registered {self.kind})")

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata `name` was registered with (defaults filled in)."""
        self.get(name)
        return dict(self._meta[name])

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def keys(self):
        return self._entries.keys()

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, entry: T) -> None:
        self.add(name, entry)

    def __delitem__(self, name: str) -> None:
        self.unregister(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    @classmethod
    def every(cls) -> list["Registry"]:
        """Every registry built so far (the consistency test walks them)."""
        return list(cls._instances)
