"""`python -m kubetasks` is the `kubetasks` command."""

from kubetasks.cli import main

main()
