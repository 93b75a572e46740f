"""The ``bkv`` command line. Each command says what it does in ``--help``;
exit codes are documented in docs/cli.md and :class:`ExitCode`."""

from __future__ import annotations

from pathlib import Path

import typer

from bkv.exitcodes import ExitCode, fail, outcomes  # noqa: F401  (ExitCode: part of this module's interface)

app = typer.Typer(help="Backup Key Vault: end-to-end encrypted backups whose key is escrowed under a password.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  # Never the pretty traceback: it prints local variables, which can be secrets.
                  pretty_exceptions_enable=False, pretty_exceptions_show_locals=False)


@app.command("audit")
def audit_command(bundles: list[Path] = typer.Argument(..., help="published bundle files (SignedBundle JSON)"),
                  witness_log: str = typer.Option(..., help="the witness log: a file, or the witness's URL"),
                  operator_root: str = typer.Option(..., help="the operator's root public key (base64)"),
                  witness_root: str = typer.Option(..., help="the witness's root public key (base64)"),
                  evidence: list[Path] = typer.Option([], help="deployment evidence files to check too")) -> None:
    """Verify a chain of validation bundles against the witness log (anyone can run it).

    Example: bkv audit bundles/*.json --witness-log https://witness.example/ --operator-root ... --witness-root ...
    """
    from bkv.audit import AuditFailed, audit
    from bkv_protocol.encoding import b64d

    try:
        if witness_log.startswith(("http://", "https://")):
            import httpx

            log_text = httpx.get(witness_log.rstrip("/") + "/witness/v1/log", timeout=10).text
        else:
            log_text = Path(witness_log).read_text()
        from bkv_protocol.bundle import read_log

        log_lines = read_log(log_text)
        texts = [b.read_text() for b in bundles]
        evidence_texts = [e.read_text() for e in evidence]
        roots = b64d(operator_root), b64d(witness_root)
    except (OSError, ValueError) as exc:
        fail(f"cannot read the inputs: {exc}", ExitCode.USAGE)
    except Exception as exc:  # noqa: BLE001 - a malformed log is an audit failure, said plainly
        fail(f"audit failed: {exc}", ExitCode.AUDIT_FAILED)
    try:
        for line in audit(texts, log_lines, *roots, evidence_texts):
            typer.echo(line)
    except AuditFailed as exc:
        fail(f"audit failed: {exc}", ExitCode.AUDIT_FAILED)


from bkv.backup_commands import register_commands  # noqa: E402  (the backup commands live apart)

register_commands(app)


def _plugins() -> None:
    """Commands other installed packages add (entry point group ``bkv.commands``):
    the local fleet's ``bkv dev`` and ``bkv demo`` come from ``bkv_dev``, which
    a client-only install does not have."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="bkv.commands"), key=lambda e: e.name):
        ep.load()(app)


_plugins()


def main() -> None:
    """``bkv``: an outcome no command caught is said the one way every command
    says it (``bkv.exitcodes.outcomes``)."""
    try:
        with outcomes():
            app()
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
