"""`python -m scsuperweight ...`: the CLI; also torchrun's entry (``torchrun --nproc-per-node N -m scsuperweight``)."""

from .cli import main

raise SystemExit(main())
