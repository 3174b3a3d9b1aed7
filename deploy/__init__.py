"""deploy: an asynchronous fleet deployment daemon built on rsync and Twisted."""

__version__ = "0.1.0"
