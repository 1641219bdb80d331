"""kaojax.infer."""
