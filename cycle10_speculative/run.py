"""python -m <cycle>.run "prompt" ... : generate from the command line (common/engine/cli.py)."""

from common.engine.cli import main

if __name__ == "__main__":
    main(__package__)
