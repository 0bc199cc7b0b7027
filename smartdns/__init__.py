"""smartdns: MediaStreamer DNS authorization server."""

__version__ = "0.1.0"
