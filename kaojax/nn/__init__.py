"""Shared neural-network building blocks: layer constructors with logical axis names
(`layers`), attention (`attention`), rematerialised calls (`remat`) and the parameter
tags that decide freezing and weight decay (`params`)."""
