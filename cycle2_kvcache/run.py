"""python -m cycle2_kvcache.run "prompt" ... : generate from the command line."""

from common.engine.cli import main

if __name__ == "__main__":
    main("cycle2_kvcache")
