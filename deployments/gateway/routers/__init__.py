"""The Gateway's routes, one router per concern; :func:`deployments.gateway.app.build_api` puts them together."""
