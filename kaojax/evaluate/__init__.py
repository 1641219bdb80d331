"""Evaluation protocols: exact scan-to-mesh distances (`distances`), the NoW benchmark
(`now`) and a synthetic NoW-style benchmark writer (`synthetic_now`)."""
