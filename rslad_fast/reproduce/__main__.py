from rslad_fast.engine.dist import exit_process
from rslad_fast.reproduce import main

exit_process(main())  # torchrun: see exit_process
