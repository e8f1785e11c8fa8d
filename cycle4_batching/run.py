"""python -m cycle4_batching.run "prompt" ... : generate from the command line."""

from common.engine.cli import main

if __name__ == "__main__":
    main("cycle4_batching")
