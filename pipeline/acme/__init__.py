"""Talking to the CAs: the ACME client over certbot's ``acme``, the accounts, the error tree,
the profiles a CA offers, the global rate limiter and the pre-validation self-check.

Named ``pipeline.acme``; inside it, ``acme`` still means certbot's library (imports are
absolute)."""
