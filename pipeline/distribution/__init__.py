"""What the edges read: the Redis layout (``layout``, importable by the edge), the pipeline's
side of it (``publishing``: publish, remove, resync, reconcile), and the Redis ACL of both
users (``acl``)."""
