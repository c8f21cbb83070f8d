"""teammesh: a peer-to-peer compute daemon for teams."""

__version__ = "0.1.0"
