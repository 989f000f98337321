"""Torch-free helpers the engine shares with the rest of `workers/`: the error classes of a
failed audit (errors), the one array reader (arrays) and the archive limits it holds files to
(limits), and the image panels (panels).

The report renderer (workers.reporting), the sandboxed runner and the CLI import them from here,
the engine too: none of them has to import the engine (torch and deepinv) for them. numpy,
matplotlib and schemas only; this package imports neither the engine nor the service
(tests/test_layers.py).
"""
