"""izitorch's built-in plugins; each is registered through the ``izitorch`` entry-point group."""
