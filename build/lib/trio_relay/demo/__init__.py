"""Data shipped with the package: ``sim-demo.jsonl.gz``, the recording behind ``replay.file = "demo"``.

Rebuild it with ``python -m trio_relay.demo.make`` (deterministic: the same bytes every time).
"""
