"""Lambda entry point: `handler.lambda_function.handler`. Importing this module is Lambda's init."""

import time

_INIT_STARTED = time.perf_counter()

from handler.aws_lambda.init import init  # noqa: E402

handler = init(_INIT_STARTED)
