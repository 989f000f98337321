"""The built-in checks, one module per check kind. Importing this package registers nothing:
workers.engine.registry holds the table of checks by `kind`."""
