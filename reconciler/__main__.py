"""`python -m reconciler` is `ukc`."""

from reconciler.cli.launcher import main

main()
