"""``python -m spinepath``."""

from spinepath.cli import main

raise SystemExit(main())
