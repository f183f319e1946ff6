"""certman's pipeline: ACME issuance, sealed keys and the store.

Kept light on purpose: ``celery -A pipeline`` finds the app in :mod:`pipeline.celery`, and the
edge imports :mod:`pipeline.crypto.envelope` and
:mod:`pipeline.distribution.layout` without pulling in Celery or the database.
"""
