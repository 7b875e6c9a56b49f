import os
import sys

from .cli import main

if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: a failing rank's traceback goes into its summary
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)
sys.exit(main())
