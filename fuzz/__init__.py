"""Fuzz harnesses (atheris/libFuzzer): ``make fuzz``, ``python -m fuzz.<harness> corpus/<harness>``."""
