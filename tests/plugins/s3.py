"""Pytest fixtures; see module docstrings of the fixtures below."""
