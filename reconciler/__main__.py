"""`python -m reconciler` is `ukc`."""

from reconciler.cli import main

main()
