"""How a user's mistake becomes one line: `error: ...` on stderr and exit status 2.

The idea
--------
A wrong flag, a missing file or a checkpoint that does not fit the model is the user's
mistake, not the program's: it deserves one line that says what is wrong and what to do, not
a traceback from deep inside torch. Every command line of the project (train.py, eval.py,
teacher.py) runs its `main` through `run_cli`, which turns the two kinds of exception
a user can cause into that line:

    ValueError   a setting that cannot work (`UsageError`, or a plain ValueError raised by
                 router.py, moe.py, data.py, ...: the lower modules need not know about us)
    OSError      a file or folder that is missing, unreadable or corrupt

Anything else is a bug and keeps its traceback. argparse's own mistakes (an unknown flag, a
bad choice) take the same one-line form through `ArgumentParser`.

This module imports nothing of the project, so every module may raise `UsageError` without
importing the command line that configures it.

Decisions
---------
* `UsageError` is a ValueError, so a caller that catches ValueError (a test, a notebook)
  catches it too.
* The usage line is not printed on an argparse error (argparse prints it, then the message):
  "(see --help)" is shorter and points to the full list of flags with their defaults.
"""

import argparse
import sys


class UsageError(ValueError):
    """A user mistake: `run_cli` prints its one line (`error: ...`), exit status 2."""


def run_cli(main, args):
    """main(args), with a user mistake printed as one line and exit status 2.

    User mistakes arrive as ValueError (UsageError, bad settings, files that do not fit) or
    OSError (missing files and folders).
    """
    try:
        return main(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.HelpFormatter):
    """`--help` with each flag's default (none shown for flags whose default is unset)."""

    def _get_help_string(self, action):
        help = action.help or ""
        unset = action.default in (None, False, "", [], argparse.SUPPRESS)
        if "%(default)" in help or unset:
            return help
        return help + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: ... (see --help)`, exit 2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
