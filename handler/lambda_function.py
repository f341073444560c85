"""Lambda entry point: `handler.lambda_function.handler`. Importing this module is Lambda's init.

The model prefetch starts first, before anything else is imported, so the weights stream in
while Python imports the rest; then init (`handler.aws_lambda.init`) loads and serves.
"""

import time

_INIT_STARTED = time.perf_counter()

from handler.environment import current  # noqa: E402
from handler.model_source.prefetch import start_early  # noqa: E402

_PREFETCH = start_early(current())

from handler.aws_lambda.init import init  # noqa: E402

handler = init(_INIT_STARTED, prefetch=_PREFETCH, awslambdaric_hooks=True)
