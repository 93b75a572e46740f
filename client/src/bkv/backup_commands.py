"""``bkv backup / restore / list / verify / password change / password forgot / disable / events``.

K is recovered from the vault for every backup and restore (nothing secret
is kept on disk); in key mode it comes from the 64 digits instead.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from bkv import errors
from bkv.exitcodes import DOCS_LOCKED_OUT, ExitCode, fail, outcomes
from bkv.storage import errors as serr

STORE = typer.Option(..., "--store", help="where backups live: a path, file://..., or s3://bucket/prefix")
JSON = typer.Option(False, "--json", help="print one JSON object instead of text (for scripts)")
PW_STDIN = typer.Option(False, "--password-stdin", help="read the password from the first line of stdin")
KEY = typer.Option(None, "--key", help="the 64-digit key of a key-mode backup (or BKV_KEY)")
# Typed at the prompt to confirm `bkv backup --new-key` (or pass --yes-abandon-old-backups).
NEW_KEY_PHRASE = "abandon old backups"
# Typed at the prompt to confirm `bkv password forgot` (or pass --yes-destroy-escrowed-key).
FORGOT_PHRASE = "destroy the escrowed key"


def _config():
    from bkv.config import ClientConfig, ConfigError

    try:
        return ClientConfig.load()
    except ConfigError as exc:
        fail(str(exc), ExitCode.USAGE)


def _password(stdin: bool, *, confirm: bool = False, prompt: str = "Password") -> str:
    if stdin:
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            fail("--password-stdin: no password on stdin", ExitCode.USAGE)
        return line
    if os.environ.get("BKV_PASSWORD"):
        return os.environ["BKV_PASSWORD"]
    if not sys.stdin.isatty():
        fail("no password: use --password-stdin, BKV_PASSWORD, or run in a terminal", ExitCode.USAGE)
    pw = getpass.getpass(f"{prompt}: ")
    if confirm and getpass.getpass(f"{prompt} (again): ") != pw:
        fail("the two passwords differ; nothing was changed", ExitCode.USAGE)
    if not pw:
        fail("the password is empty", ExitCode.USAGE)
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


class _KeyNotRecovered(Exception):
    """The vault answered that the account has no key (or a destroyed one),
    but this account is known to have one: stop, make nothing."""

    def __init__(self, answer: errors.VaultError) -> None:
        self.answer = answer


async def _recover_or_create(cfg, password: str, *, new_key: bool, guarded: bool, confirm_new) -> tuple:
    """(K, made a new one). ``guarded``: the store holds vault-mode backups or
    this device has seen an escrowed key for the account; then no vault
    answer (``no_record``, ``record_destroyed``, forged or not) makes a new
    K: only ``new_key``, confirmed by the user, does."""
    from bkv_protocol.secrets import BackupKey

    async with cfg.client() as vault:
        ticket = None
        try:
            got = await vault.recover(password)
            if not new_key:
                return got.key, False
            ticket = got.ticket  # --new-key: the password just proven replaces the escrow
        except (errors.NoRecord, errors.LockedOut) as exc:
            if guarded and not new_key:
                raise _KeyNotRecovered(exc) from None
            if isinstance(exc, errors.LockedOut) and not new_key:
                raise
        password = confirm_new(password)
        k = BackupKey(os.urandom(32))
        await vault.register(k, password, ticket)
        return k, True


def _vault_mode_backups(store: str) -> tuple[int, int]:
    """(vault-mode backups, backups whose header is damaged) in the store: a
    damaged one may have been made with the escrowed key too."""
    from bkv.storage import list_backups

    backups = list_backups(store)
    return sum(b.key_mode == "vault" for b in backups), sum(b.kind == "damaged" for b in backups)


def _stop_key_not_recovered(exc: _KeyNotRecovered, in_store: tuple[int, int], seen_here: bool) -> None:
    said = "it has no key for this account" if isinstance(exc.answer, errors.NoRecord) else \
        "the key for this account was destroyed"
    why = []
    vault, damaged = in_store
    if vault or damaged:
        n = vault + damaged
        why.append(f"this store holds {n} backup{'s' if n != 1 else ''} made with an escrowed key"
                   + (" or with a damaged header" if damaged else ""))
    if seen_here:
        why.append("this device escrowed or recovered a key for this account before")
    fail(f"backup stopped: the escrowed backup key could not be recovered (the vault answered that {said}, "
          f"but {' and '.join(why)}). Such an answer can also be forged on the network. Making a new key "
          "would leave the earlier backups undecryptable for good, so nothing was made, escrowed or written. "
          f"Try again later, and restore an earlier backup to check the key; read {DOCS_LOCKED_OUT} "
          "before starting over with a new key.", ExitCode.KEY_NOT_RECOVERED)


def _confirm_new_key(yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        fail("--new-key replaces the escrowed key: backups made with the old one can then never be decrypted. "
              "Confirm it at a terminal, or pass --yes-abandon-old-backups", ExitCode.USAGE)
    typer.echo("--new-key makes a new backup key and escrows it in place of the current one: every backup "
               "made with the current key can then never be decrypted.", err=True)
    typed = typer.prompt(f"Type \"{NEW_KEY_PHRASE}\" to go on", default="", show_default=False, err=True)
    if typed.strip().lower() != NEW_KEY_PHRASE:
        fail("not confirmed; nothing was changed", ExitCode.USAGE)


def register_commands(app: typer.Typer) -> None:
    password_app = typer.Typer(help="Manage the password that protects the backup key.", no_args_is_help=True)
    app.add_typer(password_app, name="password")

    @app.command("backup")
    def backup(source: Path = typer.Argument(..., exists=True, help="a directory or a single file (e.g. a SQLite db)"),
               store: str = STORE, key_mode: bool = typer.Option(False, "--key-mode", help=(
                   "use no vault: protect the backup with a 64-digit key, printed once")),
               key: Optional[str] = KEY, new_key: bool = typer.Option(False, "--new-key", help=(
                   "make a new backup key and escrow it in place of the current one, with the current "
                   "password (forgotten: `bkv password forgot` first); backups made with the current key can "
                   "then never be decrypted (asks for a typed confirmation)")),
               yes_abandon: bool = typer.Option(False, "--yes-abandon-old-backups", help=(
                   "with --new-key: confirm without a prompt (scripts)")),
               password_stdin: bool = PW_STDIN, as_json: bool = JSON) -> None:
        """Encrypt SOURCE on this device and write it to the store.

        The first backup makes the key K and escrows it in the vault under a
        password (asked twice); later backups recover K with the password.
        Once the store holds vault-mode backups, or this device has escrowed
        a key, a backup never makes a new key on its own: if the key does not
        come back it stops (exit 13) and only --new-key, confirmed, starts over.

        Example: bkv backup ~/chats --store s3://my-bucket/backups
        """
        from bkv.storage import create_backup
        from bkv.storage import format as fmt
        from bkv.storage.keymode import KeyDigits

        with outcomes():
            printed_digits = None
            given = key or os.environ.get("BKV_KEY")
            if key_mode or given:
                # Key mode: reuse the digits the user has, or make new ones and show them once.
                digits = KeyDigits.parse(given) if given else KeyDigits.generate()
                printed_digits = None if given else digits
                k, mode, created = digits.backup_key(), fmt.KEY_MODE_DIGITS, not given
            else:
                if yes_abandon and not new_key:
                    fail("--yes-abandon-old-backups only confirms --new-key", ExitCode.USAGE)
                cfg = _config()
                if new_key:
                    _confirm_new_key(yes_abandon)
                from bkv.config import EscrowMarks

                in_store, seen_here = _vault_mode_backups(store), EscrowMarks().has(cfg)
                pw = _password(password_stdin)

                def confirm(first: str) -> str:
                    if password_stdin or os.environ.get("BKV_PASSWORD") or not sys.stdin.isatty():
                        return first
                    if getpass.getpass("New backup key: confirm the password: ") != first:
                        fail("the two passwords differ; nothing was changed", ExitCode.USAGE)
                    return first

                try:
                    k, created = _run(_recover_or_create(cfg, pw, new_key=new_key,
                                                         guarded=bool(any(in_store) or seen_here),
                                                         confirm_new=confirm))
                except _KeyNotRecovered as exc:
                    _stop_key_not_recovered(exc, in_store, seen_here)
                _mark_escrowed(cfg)
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

        with outcomes():
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

        with outcomes():
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

        with outcomes():
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
        with outcomes():
            old = _password(password_stdin, prompt="Current password")
            new = _password(password_stdin, confirm=not password_stdin, prompt="New password")

            async def go() -> None:
                async with cfg.client() as vault:
                    await vault.change_password(old, new)  # the old one proven inside the HSM, then replaced

            _run(go())
            _mark_escrowed(cfg)
        typer.echo("password changed; existing backups stay readable with the new password")

    @password_app.command("forgot")
    def password_forgot(yes: bool = typer.Option(False, "--yes-destroy-escrowed-key", help=(
            "confirm without a prompt (scripts)"))) -> None:
        """Forgotten password: destroy the escrowed key by spending its attempts.

        Nobody, the vault's operator included, can reset the password: the
        only way to a new escrow is to use up the attempts left, exactly as
        someone guessing would, each one counted and signed by the vault.
        Then the old key is gone for good: backups made with it can never be
        decrypted. Start over with `bkv backup --new-key`.

        Example: bkv password forgot
        """
        cfg = _config()
        if not yes:
            if not sys.stdin.isatty():
                fail("this destroys the escrowed key for good. Confirm it at a terminal, or pass "
                      "--yes-destroy-escrowed-key", ExitCode.USAGE)
            typer.echo("This spends every attempt left on the escrowed key; after the last one the key is destroyed "
                       "and backups made with it can never be decrypted. If you may still remember the password, "
                       "stop here.", err=True)
            typed = typer.prompt(f"Type \"{FORGOT_PHRASE}\" to go on", default="", show_default=False, err=True)
            if typed.strip().lower() != FORGOT_PHRASE:
                fail("not confirmed; nothing was changed", ExitCode.USAGE)
        with outcomes():
            async def go() -> int:
                async with cfg.client() as vault:
                    return await vault.spend_remaining_attempts()

            spent = _run(go())
        typer.echo(f"the escrowed key is destroyed ({spent} attempt{'s' if spent != 1 else ''} spent, each signed by "
                   "the vault); make a new one with `bkv backup --new-key`")

    @app.command("disable")
    def disable(yes: bool = typer.Option(False, "--yes", help="do not ask for confirmation"),
                store: Optional[str] = typer.Option(None, "--store", help="with --delete-backups: the store"),
                delete_backups: bool = typer.Option(False, "--delete-backups", help="also delete every backup"),
                password_stdin: bool = PW_STDIN) -> None:
        """Destroy the escrowed key in the vault (and optionally the backups).

        Needs the password: the vault deletes an escrow only with proof of
        it. Backups made with that key can then never be decrypted; with
        --delete-backups they are deleted only once the vault's signed
        answer says the key is destroyed.

        Example: bkv disable --yes
        """
        from bkv.storage import delete_backups as drop

        if delete_backups and not store:
            fail("--delete-backups needs --store", ExitCode.USAGE)
        if not yes and not typer.confirm("Destroy the escrowed backup key for good?", err=True):
            raise typer.Exit(int(ExitCode.USAGE))
        cfg = _config()
        with outcomes():
            pw = _password(password_stdin)

            async def go():
                async with cfg.client() as vault:
                    try:
                        return await vault.disable(pw)
                    except (errors.LockedOut, errors.NoRecord):  # signed for this request: nothing to delete
                        return None

            deleted = _run(go())
            # Only the fleet's signature over this device's delete request is a deletion to act on.
            removed = drop(store) if delete_backups and deleted is not None else 0
        if deleted is None:
            typer.echo("no escrowed key was left" + ("; the backups were not deleted (no deletion was signed)"
                                                     if delete_backups else ""))
            return
        typer.echo("escrowed key destroyed" + (f"; {removed} backups deleted" if delete_backups else ""))


    @app.command("events")
    def events(after: int = typer.Option(0, "--after", min=0, help=(
                   "the last version this device saw: exit 16 if the vault does not show every change since")),
               as_json: bool = JSON) -> None:
        """Show what happened to the escrowed key: registered, attempts used, recovered, changed, deleted.

        Every change is signed by the vault's fleet and numbered by the
        record's version; a change hidden or altered on the way fails the
        check (exit 9). The vault keeps the last changes only: older
        versions are said to be not shown.

        Example: bkv events --after 12
        """
        cfg = _config()
        with outcomes():
            async def go():
                async with cfg.client() as vault:
                    return await vault.events(after_version=after)

            feed = _run(go())
        if as_json:
            typer.echo(json.dumps({"version": feed.version, "missing": [feed.missing.start, feed.missing.stop],
                                   "events": [e.model_dump(mode="json") for e in feed.events]}))
        else:
            if not feed.events:
                typer.echo("no changes: nothing is escrowed for this account" if feed.version == 0 else
                           "no changes shown")
            for e in feed.events:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at_ms / 1000))
                typer.echo(f"{when} UTC  #{e.version:<4} {_EVENT_TEXT[e.kind]:<24} {e.attempts_left} attempts left")
        if feed.missing:
            note = (f"versions {feed.missing.start} to {feed.missing.stop - 1} were not shown "
                    "(older than the vault keeps, or hidden)")
            if after:
                fail(f"the vault's signed feed shows changes it did not list: {note}", ExitCode.EVENTS_MISSING)
            typer.echo(f"bkv: {note}", err=True)


_EVENT_TEXT = {"registered": "key escrowed", "password_changed": "password changed",
               "attempt_used": "password attempt used", "destroyed": "key destroyed (attempts)",
               "recovered": "key recovered", "deleted": "key deleted", "rekeyed": "re-sealed (key rotation)",
               "moved": "moved (operator)"}


def _key_for(info, key: str | None, password_stdin: bool):
    from bkv.storage.keymode import KeyDigits

    if info.kind == "damaged":
        raise serr.CorruptBackup(f"backup {info.backup_id} has a damaged header")
    if info.key_mode == "digits":
        text = key or os.environ.get("BKV_KEY")
        if not text:
            if not sys.stdin.isatty():
                fail("this backup was made in key mode: pass --key (or BKV_KEY)", ExitCode.USAGE)
            text = getpass.getpass("Backup key (64 digits): ")
        return KeyDigits.parse(text).backup_key()
    cfg = _config()
    pw = _password(password_stdin)

    async def go():
        async with cfg.client() as vault:
            return (await vault.recover(pw)).key

    k = _run(go())
    _mark_escrowed(cfg)
    return k


def _mark_escrowed(cfg) -> None:
    """This device now knows the account has an escrowed key (EscrowMarks)."""
    from bkv.config import EscrowMarks

    marks = EscrowMarks()
    try:
        marks.mark(cfg)
    except OSError as exc:
        # The key is fine; only the guard for later backups is missing. Say so, go on.
        typer.echo(f"bkv: warning: could not write {marks.path} ({exc.strerror or exc}); later backups from "
                   "this device rely on the store alone to refuse making a new key", err=True)
