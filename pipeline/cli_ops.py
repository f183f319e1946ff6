"""Operations commands of ``certman``: registered on the main group by pipeline.cli."""

from __future__ import annotations
