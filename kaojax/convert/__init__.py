"""kaojax.convert."""
