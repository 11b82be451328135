"""The shared shell of every tool: --debug/--verbose, logging, and one clear line with exit status 2 on bad input."""
import argparse
import logging
import sys

#: Exceptions that mean "bad input": reported in one line, exit status 2.
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, ImportError)


def add_common(parser):
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def main(parser, fn, argv=None):
    """Parse ``argv`` with ``parser`` (plus --debug/--verbose), run ``fn(args)`` and exit.

    A user error prints ``<tool>: error: <message>`` on one line and exits with status 2.
    """
    if not any(a.dest == "debug" for a in parser._actions):
        add_common(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        result = fn(args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{parser.prog}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)


def parser(doc):
    """An ArgumentParser whose description is the tool's docstring."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
