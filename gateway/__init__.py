"""voipbin-gateway: an API gateway for the VoIPBIN REST API and APIs that follow its conventions."""

__version__ = "0.1.0"
