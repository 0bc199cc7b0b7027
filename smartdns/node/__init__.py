"""The running node: the composition root (daemon), the ordered lifecycle of components it
runs (lifecycle, components, snapshot), worker processes, systemd notification and the
metrics exposition.

The only package that imports all the others; nothing imports it but `cli`.
"""
