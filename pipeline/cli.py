"""The ``eerpipe`` command; each stage registers its own subcommands here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="eerpipe",
    help="Shard keystroke corpora, train verification models with EERLoss, evaluate and submit jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """eerpipe: distributed training with EERLoss."""


from sharding.cli import register as _register_sharding
_register_sharding(app)

if __name__ == "__main__":
    app()
