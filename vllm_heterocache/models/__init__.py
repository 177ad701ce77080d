"""Models the project prepares locally from installed packages."""
