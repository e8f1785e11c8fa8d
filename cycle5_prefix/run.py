"""python -m cycle5_prefix.run "prompt" ... : generate from the command line."""

from common.engine.cli import main

if __name__ == "__main__":
    main("cycle5_prefix")
