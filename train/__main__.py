"""`python -m fusedit.train ...` (and `torchrun --nproc_per_node=N -m fusedit.train ...`) is
`fusedit train ...`, with the same flags and the same clean errors."""
import sys

from fusedit.cli import entry

entry(["train", *sys.argv[1:]])
