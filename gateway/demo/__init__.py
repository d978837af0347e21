"""The newcomer demo: a stand-in VoIPBIN API on loopback and the gateway in front of it, offline, no account.

Only the CLI entry (gateway/cli.py) imports this package; the gateway itself never does. This module stays
light (the parser is built on every `voipbin-gateway` call); the parts load when `demo` runs.
"""
