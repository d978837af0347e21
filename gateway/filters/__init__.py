"""Filters of the request chain; gateway.app puts them in order."""
