"""Greets every word of the file given as argument, using $GREETING (set in hello.yaml)."""

import os
import sys

greeting = os.environ.get("GREETING", "Hi")
with open(sys.argv[1], encoding="utf-8") as fh:
    for word in fh.read().split():
        print(f"{greeting}, {word}!")
