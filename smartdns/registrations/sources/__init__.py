"""Where registration changes come from: the portal's sync API (and the CLI, in `cli`).

Every source writes through the store; none touches the query path directly.
"""
