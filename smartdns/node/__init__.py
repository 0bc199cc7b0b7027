"""The running node: the composition root (daemon), worker processes, systemd notification
and the metrics exposition.

The only package that imports all the others; nothing imports it but `cli`.
"""
