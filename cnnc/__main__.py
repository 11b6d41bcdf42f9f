"""`python -m cnnc` runs the command line."""

from cnnc.cli import main

raise SystemExit(main())
