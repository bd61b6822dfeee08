"""`python -m producers.cli ...`: what `accelerate launch -m producers.cli finetune ...` and
`torchrun ... -m producers.cli embed ...` run."""
from producers.cli import main

main()
