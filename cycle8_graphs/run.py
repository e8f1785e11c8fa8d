"""python -m cycle8_graphs.run "prompt" ... : generate from the command line."""

from common.engine.cli import main

if __name__ == "__main__":
    main("cycle8_graphs")
