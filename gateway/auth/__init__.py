"""Authentication: where credentials come from, how each kind is verified, and the identity that results."""
