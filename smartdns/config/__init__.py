"""Configuration: the model (frozen dataclasses) and the loader (YAML → model, `PATH:LINE`).

Imports nothing of smartdns but `errors`; only the loader and cli read settings, everything
else receives these values.
"""
