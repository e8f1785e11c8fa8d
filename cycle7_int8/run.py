"""python -m cycle7_int8.run "prompt" ... : generate from the command line."""

from common.engine.cli import main

if __name__ == "__main__":
    main("cycle7_int8")
