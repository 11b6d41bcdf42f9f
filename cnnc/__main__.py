"""`python -m cnnc` runs the command line."""

from cnnc.cli import main

if __name__ == "__main__":  # not when a spawned worker process (cnnc train --sweep --jobs) imports this module
    raise SystemExit(main())
