"""The Gateway: the HTTP face of the service (fal queue and sync routes, uploads, signed files, health, the
playground). It runs no model; its Serve class is :class:`deployments.gateway.deployment.Gateway`."""
