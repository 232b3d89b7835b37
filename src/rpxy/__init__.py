"""rpxy: a streaming reverse proxy on Twisted, configured like the Rust rpxy."""

from rpxy._version import __version__

__all__ = ["__version__"]
