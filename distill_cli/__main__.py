from .cli.main import main
from .core.processes import exit_process

exit_process(main())
