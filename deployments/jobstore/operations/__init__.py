"""The store's operations, one module per concern; :class:`~deployments.jobstore.store.SyncJobStore` joins them."""
