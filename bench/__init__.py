"""Benchmark harness for smartdns (issue 6): dnsperf runs against smartdns and its peers."""
