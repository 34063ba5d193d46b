"""The ``stable-avatar`` command: a thin entry point above the pipeline, the service and the HTTP client.

Layering: ``pipeline/`` (model and algorithm) <- ``deployments/`` (Ray Serve) <- this package. Each command family
lives in its own module: ``generate_commands`` (in process), ``serve_command`` (local Ray Serve) and
``client_commands`` (a running server, through ``client``).
"""
