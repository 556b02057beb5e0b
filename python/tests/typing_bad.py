"""mypy must reject this file: it shows the stub is in effect (scripts/test-python.sh)."""

import memplan

memplan.estimate(model="llama3-8b", micro_batch_size="4")
peak: str = memplan.estimate(model="llama3-8b").peak_allocated
