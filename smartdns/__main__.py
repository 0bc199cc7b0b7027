"""`python -m smartdns` entry point."""

from smartdns.cli import main

raise SystemExit(main())
