"""repost-monitor: find reposts of a protected image library."""

__version__ = "0.1.0"
