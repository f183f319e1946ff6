"""certman's edge: HTTP-01 answers, TLS by SNI from sealed envelopes, and the reverse proxy.

It reads Redis and its own key directory, never the database.
"""
