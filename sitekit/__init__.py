"""fedward's site kit: everything that runs inside a federation participant."""
__version__ = "0.1.0"
