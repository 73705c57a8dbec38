"""The `xrayops` command line, one module per verb group (data, train, serve, monitor, pipeline,
deploy, release, demo). It composes the core and the adapters (`serving`, `pipelines`), which it
imports inside the verbs that need them, so `--help` stays quick."""
from __future__ import annotations

from xrayops.app.cli import data, demo, deploy, monitor, pipeline, release, serve, train  # noqa: F401 (verbs)
from xrayops.app.cli.common import app, console

__all__ = ["app", "main"]


def main() -> None:
    """The `xrayops` entry point: an XrayopsError is one line on stderr and its exit code, not a traceback."""
    from xrayops.errors import XrayopsError

    try:
        app()
    except XrayopsError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
