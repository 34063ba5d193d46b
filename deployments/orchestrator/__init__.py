"""The Orchestrator: each replica claims jobs from the jobs database and runs them (prepare, the denoising loop
over the Denoisers, finish), delivers webhooks and sweeps retention. Its Serve class is
:class:`deployments.orchestrator.deployment.Orchestrator`."""
