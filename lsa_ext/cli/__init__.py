"""The ``lsa`` command line. Each subcommand lives in its own module with ``register(sub)``.

User errors (:class:`lsa_ext.errors.LsaUserError`, :class:`lsa_ext.errors.LsaTypeError`) and
usage errors (unknown option or choice, a value of the wrong type) are printed as one line and
exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lsa_ext._version import __version__
from lsa_ext.cli.options import add_threads_option, apply_threads_option
from lsa_ext.errors import LsaTypeError, LsaUserError

SUBCOMMANDS = ("analyze", "train", "evaluate", "reproduce", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line: ``lsa train: error: ... (see 'lsa train -h')``.

    Subcommand parsers inherit it (``add_subparsers`` uses the parent's class).
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """Builds the ``lsa`` parser with every subcommand module's parser."""
    import importlib

    parser = _Parser(
        prog="lsa", description="Layer Sustainability Analysis and AT-LR training."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"lsa_ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"lsa_ext.cli.{name}").register(sub)
    for command in sub.choices.values():
        add_threads_option(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lsa``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed (2)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from lsa_ext import distributed

    try:
        apply_threads_option(args)
        with distributed.failure_guard():  # under torchrun: logs "rank R failed: ..." first
            return int(args.func(args) or 0)
    except (LsaUserError, LsaTypeError) as exc:
        print(f"{distributed.rank_prefix()}lsa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lsa: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()  # destroys the process group a subcommand joined (torchrun)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
