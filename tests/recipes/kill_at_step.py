"""A torchrun worker: `sparsegrad <argv>`, except that rank 1 kills itself with SIGKILL as it starts
optimizer step N (torchrun then stops the other ranks): a sharded run cut at a known point."""
import os
import signal
import sys

from sparsegrad.recipes import finetune
from sparsegrad.recipes.cli import main

STEP = int(sys.argv[1])
train_step = finetune.FineTuneRecipe.train_step


def train_step_or_die(self):
    if self.rank == 1 and self.state.step == STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    return train_step(self)


finetune.FineTuneRecipe.train_step = train_step_or_die
sys.exit(main(sys.argv[2:]))
