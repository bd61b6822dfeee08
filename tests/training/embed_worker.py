"""One process of a multi-process `embed`, started by torchrun from tests/training/test_embed.py.

    torchrun --standalone --nproc-per-node 2 tests/training/embed_worker.py HOME MODEL [DIE_RANK DIE_AFTER]

With DIE_RANK/DIE_AFTER, that process dies (os._exit, as a kill would) right after writing its
DIE_AFTER-th part file; torchrun then stops the others. Every process prints one RESULT line.
"""
import json
import os
import sys

import torch

from producers.stores.warehouse import Home
from training.embed import parts as embed_parts
from training.embed import EmbedConfig, embed


def main() -> None:
    home, model = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if len(sys.argv) > 3 and rank == int(sys.argv[3]):
        die_after, written = int(sys.argv[4]), []
        write = embed_parts.write_part

        def write_then_die(*args, **kwargs):
            write(*args, **kwargs)
            written.append(1)
            if len(written) >= die_after:
                os._exit(3)

        embed_parts.write_part = write_then_die
    config = EmbedConfig(model=model, layers="1:", max_length=120, batch_tokens=256)
    s = embed(Home.resolve(home), "movielens-100k", config).sets[0]
    # One write call per line: the ranks share torchrun's stdout, and print() may split a line.
    line = "RESULT " + json.dumps({"rank": rank, "computed": s.n_computed, "resumed": s.n_resumed,
                                   "n_users": s.n_users, "parquet": s.parquet}) + "\n"
    os.write(1, line.encode())


if __name__ == "__main__":
    main()
