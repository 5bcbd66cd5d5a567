"""``python -m shmengine.cli``: the same as ``shmengine-run``."""

from shmengine.cli.main import main

raise SystemExit(main())
