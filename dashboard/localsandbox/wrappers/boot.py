"""Start an agent wrapper so that nothing in its working directory is imported.

    python -I -u boot.py dashboard.localsandbox.wrappers.<name>

The wrapper runs with the workspace as its cwd and holds the model's API key, while anyone who
can exec in the sandbox can write the workspace: `python -m` would put the cwd first on
`sys.path`, so a planted `dashboard/__init__.py` or `json.py` would run in the wrapper. `-I`
keeps the cwd, the script's directory, `PYTHONPATH` and the user's site-packages off the path;
this file then adds only the directory that holds the `dashboard` package.
"""

import runpy
import sys
from pathlib import Path

PREFIX = "dashboard.localsandbox.wrappers."


def main() -> None:
    module = sys.argv[1] if len(sys.argv) > 1 else ""
    if not module.startswith(PREFIX):
        sys.exit(f"usage: python -I -u {__file__} {PREFIX}<name>")
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
