"""`python -m loomserve ...` is the `loomserve` command."""

from loomserve.api.cli import main

main()
