"""Text shipped inside permissively licensed PyPI packages (no downloads at run time)."""
