"""python -m batchnorm: the command line."""

from .cli import main

raise SystemExit(main())
