"""Test tiers: unit (tests/unit), integration (tests/integration), system (tests/system)."""
