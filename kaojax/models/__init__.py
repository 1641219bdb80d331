"""kaojax.models."""
