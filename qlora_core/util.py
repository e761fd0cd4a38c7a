"""Small helpers shared by every module: the one logging function and the user-facing error type."""
import sys


class QLoRAError(Exception):
    """An error caused by the user's input (a file, a record, a flag), with a message that names it.

    The command-line scripts print such errors as one line and exit non-zero, without a traceback.
    """


def log(msg: str) -> None:
    """Print a progress message to stderr, so that stdout stays free for results."""
    print(f"[qlora_core] {msg}", file=sys.stderr, flush=True)


def run_cli(main) -> None:
    """Run a command-line entry point: a QLoRAError becomes one line on stderr and exit status 2, no traceback."""
    try:
        main()
    except QLoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
