"""Entry point inside the sandbox: `/usr/bin/python3 -I -S /run/ukc-host/agent/__main__.py`.

`-I` keeps this file's directory off `sys.path`, so the directory above the package goes there
for as long as the agent's own modules are imported, and no longer. (`__import__`, not
importlib: importlib loads warnings, and every sandbox boot pays the agent's imports.)
"""

import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(here))
    try:
        name = os.path.basename(here) + ".boot"
        __import__(name)
        boot = sys.modules[name]
    finally:
        del sys.path[0]
    sys.exit(boot.main(sys.argv[1:]))
