"""The commands: ``certman`` (``commands``, with ``operations`` added to it and what both share
in ``common``) and ``certman-onboard`` (``onboard``)."""
