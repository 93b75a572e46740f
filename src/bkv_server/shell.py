"""Every service's command line: a registry of subcommands, each a small
function registered with its parser setup, and the service's settings,
loaded and validated once per process (``serve`` and the admin subcommands
read the same object).

::

    cli = Shell("bkv-island", "A vault island of Backup Key Vault.")

    @cli.command("set-map", "write the island map to etcd", arg("islands", nargs="+"), settings=IslandAdminSettings)
    def set_map(args, settings) -> int:
        ...

    main = cli.main

A command without ``settings`` is called ``fn(args)``; with it,
``fn(args, settings)``. Settings that do not validate end the process with
``<prog>: bad settings: ...`` and exit code 2, before the command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, NamedTuple


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One ``add_argument`` call, written down for :meth:`Shell.command`."""
    return flags, options


class _Command(NamedTuple):
    fn: Callable[..., int]
    settings: type | None


class Shell:
    def __init__(self, prog: str, description: str) -> None:
        self.prog = prog
        self.parser = argparse.ArgumentParser(prog=prog, description=description)
        self._sub = self.parser.add_subparsers(dest="cmd", required=True)
        self._commands: dict[str, _Command] = {}
        self._settings: dict[type, Any] = {}

    def command(self, name: str, help: str, *args: tuple, settings: type | None = None,
                setup: Callable[[argparse.ArgumentParser], None] | None = None):
        """Register ``fn`` as subcommand ``name``: ``args`` are :func:`arg`
        specs, ``setup`` adds what they cannot say (shared flags)."""
        sub = self._sub.add_parser(name, help=help)
        for flags, options in args:
            sub.add_argument(*flags, **options)
        if setup is not None:
            setup(sub)

        def register(fn: Callable[..., int]) -> Callable[..., int]:
            self._commands[name] = _Command(fn, settings)
            return fn

        return register

    def settings(self, cls: type):
        """The service's settings of class ``cls``, read from the environment
        once; exit 2 with ``bad settings`` if they do not validate."""
        if cls not in self._settings:
            from pydantic import ValidationError

            try:
                self._settings[cls] = cls()
            except ValidationError as exc:
                print(f"{self.prog}: bad settings: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
        return self._settings[cls]

    def fail(self, message: object, code: int = 1) -> int:
        """Say ``message`` on stderr as this program; return ``code`` (the exit code)."""
        print(f"{self.prog}: {message}", file=sys.stderr)
        return code

    def error(self, message: str):
        """A usage error (exit 2), as argparse says it."""
        self.parser.error(message)

    def main(self, argv: list[str] | None = None) -> int:
        args = self.parser.parse_args(argv)
        command = self._commands[args.cmd]
        if command.settings is None:
            return command.fn(args)
        try:
            settings = self.settings(command.settings)
        except SystemExit as exc:
            return int(exc.code)
        return command.fn(args, settings)
