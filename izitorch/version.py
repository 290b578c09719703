"""The version of izitorch, in a module of its own so any module can read it without importing the package's
public facade (``izitorch/__init__.py``), which imports most of the others."""

__version__ = "0.2.0"
