"""Events to the platform by signed webhooks (Standard Webhooks).

- :mod:`~pipeline.webhooks.events`: the outbox; :func:`~pipeline.webhooks.events.record` writes
  an event, and its delivery to each subscription that wants it, in the caller's transaction;
- :mod:`~pipeline.webhooks.subscriptions`: add, list, remove (``certman api webhooks``);
- :mod:`~pipeline.webhooks.signing`: secrets, sealing, the signature headers;
- :mod:`~pipeline.webhooks.transport`: the POST, under the outbound policy;
- :mod:`~pipeline.webhooks.delivery`: claiming due deliveries, in order per site, retries,
  giving up; the tasks in :mod:`pipeline.tasks.webhooks` only call it.
"""
