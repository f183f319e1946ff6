"""Keys and what is made with them: key files, the sealed-key envelope, signed statements and
the pipeline's signing key, certificate keys and CSRs. The edge imports ``keys``, ``envelope``
and ``signing`` from here, so they import nothing from the pipeline's services."""
