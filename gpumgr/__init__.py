"""gpumgr: one door in front of several GPU services."""

__version__ = "0.1.0"
