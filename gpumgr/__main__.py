"""`python -m gpumgr`: the operator's command line (see gpumgr.cli)."""

from gpumgr.cli import main

raise SystemExit(main())
