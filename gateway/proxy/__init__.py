"""Forwarding to the upstream: plain HTTP (streamed both ways) and WebSocket."""
