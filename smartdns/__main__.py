"""`python -m smartdns` entry point."""

from smartdns.node.parent_death import die_with_parent

die_with_parent()  # a worker: before anything else, so it never outlives its main process

from smartdns.cli import main  # noqa: E402  (after the parent-death signal is armed)

raise SystemExit(main())
