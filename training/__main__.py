"""``python -m training ...`` = ``boxteacher ...``; what torchrun runs:

torchrun --nproc_per_node 8 -m training train --config C --data D --output O
"""

import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main())
