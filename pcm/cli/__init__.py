"""The `pcm` command line: one sub-command per stage, each runnable without a Prefect server."""

from __future__ import annotations

import importlib
import logging
import os

import typer

DIST_NAME = "pcm-synth"  # [project].name in pyproject.toml

EXAMPLES = """Examples:

  pcm run                                          # the toy-world demo, every stage, on the CPU (~4 minutes)

  pcm run --preset tiny --show-config              # the resolved config of a preset, nothing run

  pcm presets                                      # the pipeline presets

  pcm ingest --demo                                # one stage on its own; prints its output folder

  pcm synthesize --captions runs/ingest/<fp> --dry-run

  pcm caption photos/ --checkpoint runs/train/<fp>

  pcm run --help                                   # every command: its options and examples
"""

app = typer.Typer(
    name="pcm",
    help="Zero-shot image captioning from synthetic images (PCM-Net).\n\n"
    "Stages: ingest -> synthesize -> encode -> [refine] -> train -> evaluate. Each writes to "
    "<root>/<stage>/<fingerprint>/ and skips work that is already done.",
    epilog=EXAMPLES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines `register(app)`; heavy libraries are imported inside the commands so
# `pcm --help` stays fast.
COMMAND_MODULES = ("ingest", "synthesize", "encode", "refine", "train", "evaluate", "release", "run", "world")


def version() -> str:
    """The installed distribution's version, else the source tree's (pcm.__version__)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        from pcm import __version__

        return __version__


def quiet_libraries(record: logging.LogRecord) -> bool:
    """A log filter: libraries that log INFO through the root logger (open_clip: a dozen lines per model load)
    are heard only from WARNING up, unless --verbose; the project's own loggers are named and pass."""
    return record.name != "root" or record.levelno >= logging.WARNING


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"pcm {version()}")
        raise typer.Exit()


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
         _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(quiet_libraries)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


for _name in COMMAND_MODULES:
    importlib.import_module(f"pcm.cli.{_name}").register(app)


def run() -> None:
    """Entry point: clean one-line errors for expected failures, tracebacks with --verbose."""
    import sys

    try:
        app()
    except (ValueError, FileNotFoundError, RuntimeError, OSError, RecursionError) as e:
        if "-v" in sys.argv or "--verbose" in sys.argv:
            raise
        typer.secho(f"error: {error_message(e)}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


def error_message(e: BaseException) -> str:
    """The one line `pcm` prints for an expected failure.

    An OSError from the operating system (a read-only or full disk, a path through a file, a folder
    without permission) names its path and what to do; the project's own errors are already sentences.
    """
    if isinstance(e, RecursionError):
        return f"an input is nested too deeply to read ({e}); rerun with --verbose to see where"
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        paths = str(e.filename) if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        if isinstance(e, FileNotFoundError):
            return f"cannot use {paths}: {e.strerror}; check the path"
        return (f"cannot use {paths}: {e.strerror}; check that path and its permissions "
                "(outputs need a writable --root with free space)")
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return f"{type(e).__name__}: {e}"  # no path to name (a lock or socket error): at least say what it is
    return str(e)
