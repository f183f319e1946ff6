"""certman's HTTP API for the platform (``certman api serve``): sites in and out, their state,
renewals and revocations, over the same services as the CLI (docs/api.md)."""
