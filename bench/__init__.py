"""Benchmarks: streaming merge vs peft, and decode speed of the deployable engines (`python -m bench.run`)."""
