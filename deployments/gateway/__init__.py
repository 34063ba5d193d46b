"""The Gateway: the HTTP face of the service (fal queue and sync routes, uploads, signed files, webhook keys, health,
the playground). It runs no model.

``deployment`` is the Serve class, a shell that builds a :class:`~deployments.gateway.service.GatewayService`
(everything the routes work with, injected) and serves :func:`~deployments.gateway.app.build_api`'s app: one
router per concern in ``routers/``, the caller and its limits as dependencies (``dependencies``, ``limits``,
``uploads``), refusals in fal's error shape (``errors``)."""
