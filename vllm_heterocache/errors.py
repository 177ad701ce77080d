"""Exceptions raised for bad input. Every message names what to change (option, file or field)."""


class HeteroCacheError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(HeteroCacheError, ValueError):
    """A HeteroCache option is missing, mistyped or out of range."""


class ProfileError(HeteroCacheError, ValueError):
    """A head-profile file is malformed or inconsistent."""


class ProfileMismatchError(ProfileError):
    """A head profile was made for another model than the one being served."""


class BudgetError(HeteroCacheError, ValueError):
    """A compression budget cannot be met (e.g. the ratio is below what the full heads need)."""


class PreparationError(HeteroCacheError, RuntimeError):
    """A model or data set could not be prepared from the installed packages."""
