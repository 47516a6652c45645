"""`python -m byzjax`: the command line."""

from byzjax.cli import entry

entry()
