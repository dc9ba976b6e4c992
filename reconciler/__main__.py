"""`python -m reconciler` is `ukc`."""

from reconciler.launcher import main

main()
