"""`python -m colearn.cli`: the `colearn` command."""

from colearn.cli.main import main

main()
