import os

import torch
from hypothesis import HealthCheck, settings

# CI runs the same examples every time; locally hypothesis explores new ones.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=25
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
