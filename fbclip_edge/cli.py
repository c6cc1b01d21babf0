"""The `fbclip-edge` command line: thin typer commands over library functions."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
