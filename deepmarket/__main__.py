"""``python -m deepmarket``: the same as the ``deepmarket`` command."""

from deepmarket.cli import main

raise SystemExit(main())
