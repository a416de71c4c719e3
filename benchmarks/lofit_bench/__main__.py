"""``python -m benchmarks.lofit_bench COMMAND ...`` (see ``cli``)."""

from .cli import main

main()
