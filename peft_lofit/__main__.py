"""``python -m peft_lofit ...`` is the ``lofit`` command (e.g. ``torchrun --nproc_per_node 2 -m peft_lofit run``)."""

from .app.cli import main

raise SystemExit(main())
