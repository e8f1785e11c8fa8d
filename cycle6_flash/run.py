"""python -m cycle6_flash.run "prompt" ... : generate from the command line."""

from common.engine.cli import main

if __name__ == "__main__":
    main("cycle6_flash")
