"""stable-avatar-serve model and media code: StableAvatar inference in one process, no Ray.

Every stage is a plain function or small class with explicit inputs and outputs, so the same code runs in the
CLI, the tests and inside the Ray Serve deployments.
"""

__version__ = "0.1.0"
