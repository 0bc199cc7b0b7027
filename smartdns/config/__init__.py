"""Configuration: the model (frozen dataclasses) and the loader (YAML → model, `PATH:LINE`).

`model` the dataclasses and defaults; `loader` the entry point (`load_config`, `describe`);
`sections` the one registry of sections and their cross-checks; `unblock` the regions and
zones section; `values` what a valid address, name, URL or file is; `reader` YAML nodes to
values with each problem at its line. Imports nothing of smartdns but `errors`; only the
loader and cli read settings, everything else receives these values.
"""
