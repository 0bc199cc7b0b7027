"""Where registration changes come from: the portal's sync API (and the CLI, in `cli`).

Every source writes through `registrations.writer.RegistrationWriter`; none touches the
store's tables or the query path directly.
"""
