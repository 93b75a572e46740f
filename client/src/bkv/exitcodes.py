"""The CLI's exit codes (docs/cli.md), apart from the commands so that
commands registered by other packages (``bkv.commands``) share them."""

from __future__ import annotations

import enum

import typer


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    WRONG_PASSWORD = 3
    LOCKED_OUT = 4
    VAULT_UNAVAILABLE = 5
    CORRUPT_BACKUP = 6
    NO_RECORD = 7
    UNAUTHORIZED = 8
    BAD_SIGNATURE = 9
    WRONG_KEY = 10
    STORE_ERROR = 11
    AUDIT_FAILED = 12
    KEY_NOT_RECOVERED = 13  # bkv backup stopped: the escrowed key did not come back, and no new one was made
    ESCROW_EXISTS = 14  # a live escrow is replaced only with its password (or after `bkv password forgot`)


def _fail(message: str, code: ExitCode) -> None:
    typer.echo(f"bkv: {message}", err=True)
    raise typer.Exit(int(code))
