"""deploy: an asynchronous fleet deployment daemon built on rsync and Twisted."""

__version__ = "0.1.0"


def version_text(program: str) -> str:
    """What `--version` prints: deploy's version, and Twisted's and Python's it runs on. Read
    from the installed metadata, so that `deploy-client --version` imports no Twisted."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        twisted = version("twisted")
    except PackageNotFoundError:
        twisted = "not installed"
    python = platform.python_version()
    return f"{program} (deploy) {__version__}\nTwisted {twisted}\nPython {python}"
