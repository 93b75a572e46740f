"""``bkv backup / restore / list / verify / password change / disable``.

K is recovered from the vault for every backup and restore (nothing secret
is kept on disk); in key mode it comes from the 64 digits instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import typer

from bkv import errors
from bkv.storage import errors as serr

STORE = typer.Option(..., "--store", help="where backups live: a path, file://..., or s3://bucket/prefix")
JSON = typer.Option(False, "--json", help="print one JSON object instead of text (for scripts)")
PW_STDIN = typer.Option(False, "--password-stdin", help="read the password from the first line of stdin")
KEY = typer.Option(None, "--key", help="the 64-digit key of a key-mode backup (or BKV_KEY)")


def _exit():
    from bkv.cli import ExitCode

    return ExitCode


def _fail(message: str, code) -> None:
    typer.echo(f"bkv: {message}", err=True)
    raise typer.Exit(int(code))


@contextlib.contextmanager
def _outcomes() -> Iterator[None]:
    """Every expected failure becomes its documented exit code and one line."""
    E = _exit()
    try:
        yield
    except errors.WrongPassword as exc:
        _fail(str(exc), E.WRONG_PASSWORD)
    except errors.LockedOut as exc:
        _fail(f"{exc}. Backups protected by it can no longer be decrypted. "
              "`bkv backup --new-key` starts over with a new key.", E.LOCKED_OUT)
    except errors.VaultUnavailable as exc:
        _fail(str(exc), E.VAULT_UNAVAILABLE)
    except errors.NoRecord:
        _fail("no key is escrowed for this account: nothing to recover (was the backup made in key mode?)",
              E.NO_RECORD)
    except errors.Unauthorized as exc:
        _fail(str(exc), E.UNAUTHORIZED)
    except errors.BadSignature as exc:
        _fail(str(exc), E.BAD_SIGNATURE)
    except errors.VaultError as exc:
        _fail(str(exc), E.ERROR)
    except serr.CorruptBackup as exc:
        _fail(f"the backup is corrupt or was tampered with: {exc}. Nothing was restored.", E.CORRUPT_BACKUP)
    except (serr.WrongKey, serr.BadKeyDigits) as exc:
        _fail(str(exc), E.WRONG_KEY)
    except (serr.StoreError, serr.NoBackup) as exc:
        _fail(str(exc), E.STORE_ERROR)
    except (serr.DestinationNotEmpty, serr.UnsupportedEntry) as exc:
        _fail(str(exc), E.USAGE)


def _config():
    from bkv.config import ClientConfig, ConfigError

    try:
        return ClientConfig.load()
    except ConfigError as exc:
        _fail(str(exc), _exit().USAGE)


def _password(stdin: bool, *, confirm: bool = False, prompt: str = "Password") -> str:
    if stdin:
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            _fail("--password-stdin: no password on stdin", _exit().USAGE)
        return line
    if os.environ.get("BKV_PASSWORD"):
        return os.environ["BKV_PASSWORD"]
    if not sys.stdin.isatty():
        _fail("no password: use --password-stdin, BKV_PASSWORD, or run in a terminal", _exit().USAGE)
    pw = getpass.getpass(f"{prompt}: ")
    if confirm and getpass.getpass(f"{prompt} (again): ") != pw:
        _fail("the two passwords differ; nothing was changed", _exit().USAGE)
    if not pw:
        _fail("the password is empty", _exit().USAGE)
    return pw


class _Bar:
    """A progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str, quiet: bool) -> None:
        self._label, self._bar, self._done = label, None, 0
        self._on = not quiet and sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self._on:
            return
        if self._bar is None:
            self._bar = typer.progressbar(length=max(total, 1), label=self._label, file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _run(coro):
    return asyncio.run(coro)


async def _recover_or_create(cfg, password: str, *, new_key: bool, confirm_new) -> tuple:
    from bkv_common.secrets import BackupKey

    async with cfg.client() as vault:
        if not new_key:
            try:
                return (await vault.recover(password)).key, False
            except errors.NoRecord:
                pass
        password = confirm_new(password)
        k = BackupKey(os.urandom(32))
        await vault.register(k, password)
        return k, True


def register_commands(app: typer.Typer) -> None:
    password_app = typer.Typer(help="Manage the password that protects the backup key.", no_args_is_help=True)
    app.add_typer(password_app, name="password")

    @app.command("backup")
    def backup(source: Path = typer.Argument(..., exists=True, help="a directory or a single file (e.g. a SQLite db)"),
               store: str = STORE, key_mode: bool = typer.Option(False, "--key-mode", help=(
                   "use no vault: protect the backup with a 64-digit key, printed once")),
               key: Optional[str] = KEY, new_key: bool = typer.Option(False, "--new-key", help=(
                   "make a new backup key and escrow it (after a lockout or to rotate)")),
               password_stdin: bool = PW_STDIN, as_json: bool = JSON) -> None:
        """Encrypt SOURCE on this device and write it to the store.

        The first backup makes the key K and escrows it in the vault under a
        password (asked twice); later backups recover K with the password.

        Example: bkv backup ~/chats --store s3://my-bucket/backups
        """
        from bkv.storage import create_backup
        from bkv.storage import format as fmt
        from bkv.storage.keymode import KeyDigits

        with _outcomes():
            printed_digits = None
            given = key or os.environ.get("BKV_KEY")
            if key_mode or given:
                # Key mode: reuse the digits the user has, or make new ones and show them once.
                digits = KeyDigits.parse(given) if given else KeyDigits.generate()
                printed_digits = None if given else digits
                k, mode, created = digits.backup_key(), fmt.KEY_MODE_DIGITS, not given
            else:
                cfg = _config()
                pw = _password(password_stdin)

                def confirm(first: str) -> str:
                    if password_stdin or os.environ.get("BKV_PASSWORD") or not sys.stdin.isatty():
                        return first
                    if getpass.getpass("New backup key: confirm the password: ") != first:
                        _fail("the two passwords differ; nothing was changed", _exit().USAGE)
                    return first

                k, created = _run(_recover_or_create(cfg, pw, new_key=new_key, confirm_new=confirm))
                mode = fmt.KEY_MODE_VAULT
            bar = _Bar("encrypting", as_json)
            t = time.monotonic()
            try:
                info = create_backup(source, store, k, key_mode=mode, progress=bar)
            finally:
                bar.close()
        out = {**info.as_dict(), "new_key": created, "seconds": round(time.monotonic() - t, 2)}
        if printed_digits is not None:
            out["key"] = printed_digits.grouped()
        if as_json:
            typer.echo(json.dumps(out))
            return
        typer.echo(f"backup {info.backup_id} written to {store} ({info.size} bytes)")
        if printed_digits is not None:
            typer.echo("\nYour backup key -- write it down now; it is shown only this once and nobody can "
                       "recover it for you:\n")
            typer.echo(f"    {printed_digits.grouped()}\n")
        elif created:
            typer.echo("a new backup key was made and escrowed in the vault under your password")

    @app.command("restore")
    def restore(store: str = STORE, dest: Path = typer.Option(..., "--dest", help="an absent or empty directory"),
                key: Optional[str] = KEY, backup_id: Optional[str] = typer.Option(None, "--backup",
                                                                                  help="backup id (default: latest)"),
                replace: bool = typer.Option(False, "--replace", help="replace a non-empty DEST, only on success"),
                password_stdin: bool = PW_STDIN, as_json: bool = JSON) -> None:
        """Recover the key, authenticate the whole backup, then move it into DEST.

        A failed restore leaves DEST exactly as it was.

        Example: bkv restore --store s3://my-bucket/backups --dest ~/chats-restored
        """
        from bkv.storage import latest_info, restore_backup

        with _outcomes():
            k = _key_for(latest_info(store, backup_id), key, password_stdin)
            bar = _Bar("restoring", as_json)
            try:
                info = restore_backup(store, dest, k, backup_id, replace=replace, progress=bar)
            finally:
                bar.close()
        if as_json:
            typer.echo(json.dumps({**info.as_dict(), "dest": str(dest)}))
        else:
            typer.echo(f"restored backup {info.backup_id} into {dest}")

    @app.command("list")
    def list_(store: str = STORE, as_json: bool = JSON) -> None:
        """List the backups in a store, oldest first.

        Example: bkv list --store ./backups
        """
        from bkv.storage import list_backups

        with _outcomes():
            backups = list_backups(store)
        if as_json:
            typer.echo(json.dumps([b.as_dict() for b in backups]))
            return
        if not backups:
            typer.echo(f"no backups in {store}")
        for b in backups:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.created / 1000))
            typer.echo(f"{b.backup_id}  {when}  {b.kind:<4}  {b.key_mode:<6}  {b.size} bytes")

    @app.command("verify")
    def verify(store: str = STORE, key: Optional[str] = KEY,
               backup_id: Optional[str] = typer.Option(None, "--backup", help="backup id (default: latest)"),
               password_stdin: bool = PW_STDIN, as_json: bool = JSON) -> None:
        """Authenticate every byte of a backup without writing anything.

        Example: bkv verify --store ./backups
        """
        from bkv.storage import latest_info, verify_backup

        with _outcomes():
            k = _key_for(latest_info(store, backup_id), key, password_stdin)
            bar = _Bar("verifying", as_json)
            try:
                info = verify_backup(store, k, backup_id, progress=bar)
            finally:
                bar.close()
        typer.echo(json.dumps({**info.as_dict(), "ok": True}) if as_json else f"backup {info.backup_id} is intact")

    @password_app.command("change")
    def password_change(password_stdin: bool = typer.Option(False, "--password-stdin", help=(
            "read the old and the new password from the first two lines of stdin"))) -> None:
        """Re-escrow the same key under a new password (the old one stops working).

        Example: bkv password change
        """
        cfg = _config()
        with _outcomes():
            old = _password(password_stdin, prompt="Current password")
            new = _password(password_stdin, confirm=not password_stdin, prompt="New password")

            async def go() -> None:
                async with cfg.client() as vault:
                    k = (await vault.recover(old)).key
                    await vault.register(k, new)

            _run(go())
        typer.echo("password changed; existing backups stay readable with the new password")

    @app.command("disable")
    def disable(yes: bool = typer.Option(False, "--yes", help="do not ask for confirmation"),
                store: Optional[str] = typer.Option(None, "--store", help="with --delete-backups: the store"),
                delete_backups: bool = typer.Option(False, "--delete-backups", help="also delete every backup")) -> None:
        """Destroy the escrowed key in the vault (and optionally the backups).

        Backups made with that key can then never be decrypted.

        Example: bkv disable --yes
        """
        from bkv.storage import delete_backups as drop

        if delete_backups and not store:
            _fail("--delete-backups needs --store", _exit().USAGE)
        if not yes and not typer.confirm("Destroy the escrowed backup key for good?", err=True):
            raise typer.Exit(int(_exit().USAGE))
        cfg = _config()
        with _outcomes():
            async def go() -> bool:
                async with cfg.client() as vault:
                    return await vault.delete()

            deleted = _run(go())
            removed = drop(store) if delete_backups else 0
        typer.echo(("escrowed key destroyed" if deleted else "no escrowed key was left")
                   + (f"; {removed} backups deleted" if delete_backups else ""))


def _key_for(info, key: str | None, password_stdin: bool):
    from bkv.storage.keymode import KeyDigits

    if info.kind == "damaged":
        raise serr.CorruptBackup(f"backup {info.backup_id} has a damaged header")
    if info.key_mode == "digits":
        text = key or os.environ.get("BKV_KEY")
        if not text:
            if not sys.stdin.isatty():
                _fail("this backup was made in key mode: pass --key (or BKV_KEY)", _exit().USAGE)
            text = getpass.getpass("Backup key (64 digits): ")
        return KeyDigits.parse(text).backup_key()
    cfg = _config()
    pw = _password(password_stdin)

    async def go():
        async with cfg.client() as vault:
            return (await vault.recover(pw)).key

    return _run(go())
