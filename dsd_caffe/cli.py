"""The shell of every tool: a parser whose description is the tool's docstring, one vocabulary of flags, logging,
and one clear line for bad input.

- :func:`parser`: ``--help`` shows the tool's docstring and every flag's default.
- :func:`main`: parses, sets up logging, runs the tool's one library call and exits: 0 on success; 2 with one line
  ``<tool>: error: <message>`` for a :class:`~dsd_caffe.errors.UserError` or an OS error (a missing, unwritable or
  full path); 130 with one line on Ctrl-C or SIGTERM; :data:`DIVERGED` (3) when a tool reports a diverged model
  (a loss or output that is not finite). Anything else is a bug and shows its traceback.
- The vocabulary (a test checks it across every tool's ``--help``): ``--output`` for every output; ``--max-iter``,
  ``--epochs``, ``--base-lr`` for one phase, prefixed with the phase (``--sparse-max-iter``,
  ``--redense-base-lr``) where a tool drives several; ``--iterations`` for evaluation batches; lists are
  comma-separated (:func:`add_list`; repeating the flag also works). Old spellings are kept for one release
  (:func:`add_deprecated`) and print one deprecation line.
"""
import argparse
import errno
import logging
import os
import signal
import sys

from .errors import Interrupted, UserError

log = logging.getLogger("dsd_caffe.cli")

#: OS errors reported in one line: missing, unwritable, in-the-way or full paths. Other OSErrors are bugs too rare
#: to guess about, but still environmental: they are reported in one line as well.
USER_ERRORS = (UserError, OSError)
#: the exit status of a tool that reports a diverged model (evaluate.py unless --allow-diverged, dsd.py)
DIVERGED = 3
_FULL = (errno.ENOSPC, errno.EDQUOT)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's line breaks and appends ``(default: X)`` to a flag's help when it has a default
    worth showing and its help does not state one already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default is argparse.SUPPRESS or default == [])
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def prog(module):
    """How the user started a module's command, for its usage line: the installed command's name (``dsd-zoo``,
    ``dsd-info``), ``python -m <module>`` when that module's file runs, else None (argparse's default: the
    script's name, ``zoo.py`` for ``tools/zoo.py``)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    name = os.path.basename(argv0)
    if name.startswith("dsd-"):
        return name
    if os.path.abspath(argv0).endswith(os.sep + module.replace(".", os.sep) + ".py"):
        return f"python -m {module}"
    return None


def parser(doc, prog=None):
    """An ArgumentParser whose description is the tool's docstring."""
    return argparse.ArgumentParser(description=doc, prog=prog, formatter_class=HelpFormatter)


def add_common(p):
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return p


# ------------------------------------------------------------------------------------------------ vocabulary
class _ListAction(argparse.Action):
    """Comma-separated values; a repeated flag adds to the list."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items += [v.strip() for v in values.split(",") if v.strip()]
        setattr(namespace, self.dest, items)


def add_list(p, *flags, help, default=None, **kw):
    """A list flag: ``--skip conv1,fire2/*`` (or ``--skip conv1 --skip fire2/*``)."""
    return p.add_argument(*flags, action=_ListAction, default=default, metavar=kw.pop("metavar", "A,B,..."),
                          help=help + " (comma-separated)", **kw)


class _DeprecatedAction(argparse.Action):
    def __init__(self, option_strings, dest, new=None, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        notes = getattr(namespace, "_deprecations", [])
        notes.append(f"{option_string} is deprecated and goes in the next release; use {self.new}")
        namespace._deprecations = notes


def add_deprecated(p, old, new, dest, type=None):
    """Keep the old spelling ``old`` of flag ``new`` for one release: it sets ``dest`` and logs one line."""
    p.add_argument(old, dest=dest, type=type, new=new, action=_DeprecatedAction, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


def add_output(p, help, legacy_positional=False, required=True):
    """``--output PATH``; with ``legacy_positional`` the old positional spelling still works for one release."""
    p.add_argument("--output", "-o", help=help, default=None)
    if legacy_positional:
        p.add_argument("legacy_output", nargs="?", default=None, help=argparse.SUPPRESS)
    checks = getattr(p, "_dsd_checks", [])
    checks.append(lambda a: _resolve_output(p, a, legacy_positional, required))
    p._dsd_checks = checks


def _resolve_output(p, a, legacy, required):
    old = getattr(a, "legacy_output", None) if legacy else None
    if old is not None:
        if a.output is not None:
            p.error(f"give the output once: --output {a.output} or the positional {old}, not both")
        a.output = old
        notes = getattr(a, "_deprecations", [])
        notes.append("the positional output argument is deprecated and goes in the next release; use --output")
        a._deprecations = notes
    if required and a.output is None:
        p.error("the following arguments are required: --output")


def run_checks(p, args):
    """Run the checks :func:`add_output` attached to ``p`` and to the sub-command ``args`` chose, after parsing."""
    chosen = [a.choices.get(getattr(args, a.dest, None)) for a in p._actions
              if isinstance(a, argparse._SubParsersAction)]
    for parser in [p, *filter(None, chosen)]:
        for check in getattr(parser, "_dsd_checks", []):
            check(args)


def _flag(dest):
    return "--" + dest.replace("_", "-")


def _utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ the shell
def _sigterm(signum, frame):
    raise KeyboardInterrupt


def catch_early_interrupts():
    """Ctrl-C before :func:`main` runs the tool (while its modules load, while it parses) ends it with one line,
    ``<tool>: interrupted``, and exit status 130, not a KeyboardInterrupt traceback. The tools' shims call this
    first; :func:`main` calls it too (the installed commands), and hands Ctrl-C back to Python when the tool
    starts."""
    signal.signal(signal.SIGINT, _early_interrupt)


def _early_interrupt(signum, frame):
    import os

    print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)


def _message(e):
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        hint = "; free some space and run the same command again" if e.errno in _FULL else ""
        return f"{e.strerror}{where}{hint}"
    return str(e)


#: the log line of every tool, unless it gives its own (``main``'s ``log_format``)
LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def main(p, fn, argv=None, log_format=LOG_FORMAT):
    """Parse ``argv`` with ``p`` (plus --debug/--verbose), run ``fn(args)`` and exit (see the module doc).
    ``log_format`` is the format of the log lines (the set-up's own ``[setup HH:MM:SS]``, for one)."""
    catch_early_interrupts()
    if not any(a.dest == "debug" for a in p._actions):
        add_common(p)
    args = p.parse_args(argv)
    run_checks(p, args)
    for name, value in vars(args).items():  # Caffe, protobuf and JSON need text: a name that is not UTF-8 is refused
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not _utf8(v):
                p.error(f"{_flag(name)} {v.encode('utf-8', 'backslashreplace').decode()}: a file name that is not "
                        "valid UTF-8; rename it")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=log_format,
        datefmt="%H:%M:%S",
    )
    for note in getattr(args, "_deprecations", []):
        log.warning("%s", note)
    signal.signal(signal.SIGTERM, _sigterm)  # this process is the tool's own: SIGTERM ends it like Ctrl-C
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C is a KeyboardInterrupt
        result = fn(args)
    except Interrupted as e:
        print(f"{p.prog}: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"{p.prog}: error: {_message(e)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)
