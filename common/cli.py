"""Command-line error handling shared by every stage's commands."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console

_errors = Console(stderr=True)


def clean_errors(*expected: type[BaseException]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Expected failures end with one clear line on stderr and exit status 1, not a traceback."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except expected as error:
                print_error(str(error))
                raise typer.Exit(1) from error

        return run

    return decorate


def print_error(message: str) -> None:
    """One line on stderr, as every command reports a failure."""
    _errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
