"""`python -m fbclip_edge ...` runs the `fbclip-edge` command (for installs without scripts)."""

from fbclip_edge.cli import app

app(prog_name="fbclip-edge")
