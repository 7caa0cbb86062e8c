"""``python -m kis_safe_token``: the ``kis-token`` command line."""

from .cli import main

raise SystemExit(main())
