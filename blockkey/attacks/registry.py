"""The attack registry: every attack declared once, with one ``run(target, data, settings)`` signature.

An attack module ends with a small frozen dataclass of its settings (each CLI option a field made
with :func:`option`) and one :func:`register_attack` call. The CLI (``blockkey attack NAME``), the
attack suite and explore_recipes read :data:`ATTACKS` (through :func:`attacks`): the subparser of
``NAME`` gets the settings' options, ``--plot`` uses the attack's ``x_axis``. Adding an attack is one
new module in :mod:`blockkey.attacks` (it is imported on first use of the registry) plus its tests.

Example:
    >>> spec = get_attack("known-plaintext")
    >>> spec.x_axis, spec.settings().pairs
    ('pairs', [1, 2, 4])
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from .. import argtypes as at
from ..data import Data
from ..errors import BlockkeyError
from . import AttackReport, Target

__all__ = [
    "ATTACKS",
    "AttackData",
    "AttackSpec",
    "add_attack_parsers",
    "attacks",
    "get_attack",
    "option",
    "register_attack",
    "run_attack",
    "seed_option",
    "settings_from_args",
]

S = TypeVar("S")


@dataclass(frozen=True)
class AttackData:
    """What the attacker holds besides the stolen model: a labelled plain image pool (``train``), the stolen
    run directory (attacks that restart training from it), and whether to show progress bars."""

    train: Data
    run_dir: Path | None = None
    progress: bool = True


@dataclass(frozen=True)
class AttackSpec(Generic[S]):
    """One registered attack.

    Attributes:
        name: the CLI name (``blockkey attack NAME``) and the report's ``attack``.
        help: one line for ``--help``.
        settings: a dataclass whose fields made with :func:`option` are the attack's CLI options.
        run: ``run(target, data, settings) -> AttackReport``.
        x_axis: the row field its plots put on the x axis; None for attacks with one row.
    """

    name: str
    help: str
    settings: type[S]
    run: Callable[[Target, AttackData, S], AttackReport]
    x_axis: str | None = None


#: Registered attacks by name, in registration order (the order of ``blockkey attack --help``).
ATTACKS: dict[str, AttackSpec[Any]] = {}


def register_attack(spec: AttackSpec[S]) -> AttackSpec[S]:
    """Add ``spec`` to :data:`ATTACKS`; a name registers once."""
    if spec.name in ATTACKS:
        raise ValueError(f"attack {spec.name!r} is already registered")
    if not dataclasses.is_dataclass(spec.settings):
        raise TypeError(f"attack {spec.name!r}: settings must be a dataclass")
    ATTACKS[spec.name] = spec
    return spec


def option(default: Any, help: str, *flags: str, **argparse_kwargs: Any) -> Any:
    """A settings field that is also a CLI option (``--field-name`` unless ``flags`` are given).

    ``argparse_kwargs`` go to ``add_argument`` (``type=``, ``nargs=``, ``choices=``, ``metavar=``).
    """
    meta = {"help": help, "flags": flags, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def seed_option() -> Any:
    """The ``--seed`` of attacks with random draws."""
    return option(0, "the attacker's random draws", type=at.SEED)


def attacks() -> dict[str, AttackSpec[Any]]:
    """:data:`ATTACKS` after importing every module of :mod:`blockkey.attacks` (each registers its attack)."""
    from .. import attacks as package

    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{mod.name}")
    return ATTACKS


def get_attack(name: str) -> AttackSpec[Any]:
    """The registered attack ``name``; :class:`~blockkey.errors.BlockkeyError` naming the known ones otherwise."""
    specs = attacks()
    if name not in specs:
        raise BlockkeyError(f"unknown attack {name!r}; expected one of {', '.join(specs)}")
    return specs[name]


def run_attack(name: str, target: Target, data: AttackData, **settings: Any) -> AttackReport:
    """Run attack ``name`` with its default settings, ``settings`` overriding them."""
    spec = get_attack(name)
    return spec.run(target, data, spec.settings(**settings))


def add_attack_parsers(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg,unused-ignore]
    parents: Sequence[argparse.ArgumentParser] = (),
) -> None:
    """One subparser per registered attack: the common ``parents`` plus the attack's own options."""
    for spec in attacks().values():
        sp = sub.add_parser(spec.name, help=spec.help, description=spec.help, parents=list(parents))
        for f in dataclasses.fields(spec.settings):
            if "help" not in f.metadata:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            flags = f.metadata["flags"] or (f"--{f.name.replace('_', '-')}",)
            helptext = f.metadata["help"] + ("" if default is None else " (default %(default)s)")
            sp.add_argument(*flags, dest=f.name, default=default, help=helptext, **f.metadata["argparse"])
        sp.set_defaults(attack_spec=spec)


def settings_from_args(spec: AttackSpec[S], args: argparse.Namespace) -> S:
    """The settings of ``spec`` from parsed arguments (fields without a CLI option keep their defaults)."""
    fields = dataclasses.fields(spec.settings)  # type: ignore[arg-type]  # register_attack checked: a dataclass
    given = {f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}
    return spec.settings(**given)
