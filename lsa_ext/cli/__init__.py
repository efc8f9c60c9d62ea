"""The ``lsa`` command line. Each subcommand lives in its own module with ``register(sub)``.

User errors (:class:`lsa_ext.errors.LsaUserError`, :class:`lsa_ext.errors.LsaTypeError`) and
usage errors (unknown option or choice, a value of the wrong type) are printed as one line and
exit with status 2, without a traceback; under torchrun only the first process of each machine
(``LOCAL_RANK`` 0) prints it: every rank meets the same mistake, and a machine whose files
differ still says why. Ctrl-C exits with status 130 and a line saying how to continue
(:class:`lsa_ext.cli.options.Interrupted`). ``args.given`` holds the dests of the options given
explicitly on the command line (not left at their defaults).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lsa_ext._version import __version__
from lsa_ext.cli.options import add_threads_option, apply_threads_option
from lsa_ext.errors import LsaTypeError, LsaUserError

SUBCOMMANDS = ("analyze", "train", "evaluate", "reproduce", "demo")


class _UsageError(Exception):
    """A usage error of ``parser``, raised instead of exiting while :func:`main` parses."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser, self.message = parser, message

    def line(self) -> str:
        prog = self.parser.prog
        return f"{prog}: error: {self.message} (see '{prog} --help')"


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line: ``lsa train: error: ... (see 'lsa train -h')``.

    Subcommand parsers inherit it (``add_subparsers`` uses the parent's class). While
    :func:`main` parses (``raising``), errors raise :class:`_UsageError` so that it can report
    an unknown option before a missing required one.
    """

    raising = False

    def error(self, message: str):  # type: ignore[override]
        err = _UsageError(self, message)
        if _Parser.raising:
            raise err
        self.exit(2, err.line() + "\n")


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


def given_options(argv: list[str]) -> set[str]:
    """The dests of the options given explicitly in ``argv`` (a valid command line): ``argv``
    parsed again by a parser whose defaults are all suppressed."""
    parser = build_parser()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for p in parsers:
        for action in p._actions:
            if action.option_strings:  # positionals keep theirs (choices are checked on it)
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"func", "command"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lsa``; returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parse(parser, argv)
    except _UsageError as exc:
        print(exc.line(), file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version (0)
        return exc.code if isinstance(exc.code, int) else 2
    args.given = given_options(argv)
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
        with distributed.failure_guard(expected=(LsaUserError, LsaTypeError, KeyboardInterrupt)):
            return int(args.func(args) or 0)
    except (LsaUserError, LsaTypeError) as exc:
        if _first_local_rank():
            print(f"lsa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if _first_local_rank():
            hint = getattr(exc, "hint", None)
            print(f"lsa {args.command}: interrupted" + (f"; {hint}" if hint else ""),
                  file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()  # destroys the process group a subcommand joined (torchrun)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; raises :class:`_UsageError` from the parser it concerns — unknown
    options from the subcommand's parser, and before a missing required option (a typo in
    ``--checkpoint`` is reported as the typo)."""
    _Parser.raising = True
    try:
        try:
            args, extra = parser.parse_known_args(argv)
        except _UsageError as exc:
            unknown = _unknown_options(parser, argv) if "are required" in exc.message else []
            if unknown:
                raise _UsageError(exc.parser, f"unrecognized arguments: {' '.join(unknown)}"
                                  ) from None
            raise
        if extra:
            raise _UsageError(_command_parser(parser, getattr(args, "command", None)),
                              f"unrecognized arguments: {' '.join(extra)}")
        return args
    finally:
        _Parser.raising = False


def _unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The arguments of ``argv`` that no parser knows, found with no option required."""
    parsers = [parser] + [p for a in parser._actions
                          if isinstance(a, argparse._SubParsersAction)
                          for p in a.choices.values()]
    required = [(a, a.required) for p in parsers for a in p._actions if a.option_strings]
    try:
        for a, _ in required:
            a.required = False
        return parser.parse_known_args(argv)[1]
    except _UsageError:
        return []
    finally:
        for a, was in required:
            a.required = was


def _command_parser(parser: argparse.ArgumentParser,
                    command: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand ``command`` (``parser`` itself when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def _first_local_rank() -> bool:
    """False on the processes of a torchrun job but the first of each machine (``LOCAL_RANK``
    set by torchrun), True otherwise."""
    import os

    return os.environ.get("LOCAL_RANK", "0").strip() in ("", "0")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
