"""Running the console entry points in-process, as the tests of their exit codes and messages do."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def run_cli(main: Callable[[list[str]], int], argv: Sequence[Any], capsys: Any) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit code, stdout, stderr); a ``SystemExit`` (argparse's errors) counts as its code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
