"""The `grin-peft` console entry point: parses the command line before the heavy package is imported.

`import grin_peft` imports peft and transformers (seconds), because it registers GRIN with PEFT. This launcher
creates the package's module object without running its `__init__`, imports the light `grin_peft.cli` and lets it
parse; `grin_peft.cli.main` runs the `__init__` only for a command that will do work. `--help` and a mistyped flag
therefore answer in a fraction of a second (BENCHMARKS.md, "Reliability").
"""

from __future__ import annotations

import importlib.util
import sys


def main() -> int:
    """Run `grin-peft` with the package's import deferred until the arguments are parsed."""
    if "grin_peft" not in sys.modules:
        spec = importlib.util.find_spec("grin_peft")
        sys.modules["grin_peft"] = importlib.util.module_from_spec(spec)
    from grin_peft.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
