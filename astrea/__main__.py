"""``python -m astrea ...`` = ``astrea ...``; handy under torchrun:
``torchrun --nproc-per-node 8 -m astrea train --config train.yaml``.

(Here, not in train/: the command line sits above every package, and train/ never imports it.)"""

from __future__ import annotations

from astrea.cli import main

if __name__ == "__main__":
    main()
